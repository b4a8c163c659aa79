"""``distill`` command line. Heavy libraries (torch, ray, onnxruntime) load only inside commands."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from distill.core.env import set_env_defaults
from distill.core.errors import DistillError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Distill large teachers into small, deployable students."
)

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. student.epochs=1")]
Force = Annotated[bool, typer.Option("--force", help="redo stages even if their outputs are up to date")]
Resume = Annotated[
    bool,
    typer.Option("--resume/--restart", help="continue a killed training run from its last checkpoint, or start over"),
]


def _guard(fn):
    """Run ``fn``; a DistillError becomes one red line on stderr and exit code 2, a ``PartialRun`` (the
    teacher failed on some rows) one yellow line and exit code 3."""
    from distill.teachers.budget import PartialRun

    try:
        return fn()
    except PartialRun as e:
        from rich.markup import escape

        from distill.core.progress import console

        console.print(f"[bold yellow]partial:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(PartialRun.exit_code) from None
    except DistillError as e:
        _fail(str(e))
    except (OSError, sqlite3.OperationalError) as e:
        reason = storage_problem(e)
        if reason is None:
            raise
        where = getattr(e, "filename", None) or ""
        if where and Path(where).name.startswith(".") and Path(where).name.endswith(".tmp"):
            where = str(Path(where).parent)  # name the folder, not our temp file
        where = f" {where}" if where else ""
        _fail(
            f"cannot write{where}: {reason} — free space or make the output folder writable "
            "(output_dir=..., cache=...), then run the same command again: committed work is kept"
        )


# Storage failures a user fixes (full disk, quota, read-only or forbidden folder, file size limit).
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
SQLITE_STORAGE = {
    "database or disk is full": os.strerror(errno.ENOSPC),
    "attempt to write a readonly database": os.strerror(errno.EROFS),
    "unable to open database file": "cannot open the database file",
}


def storage_problem(e: BaseException) -> str | None:
    """The storage reason behind an exception from the OS, pyarrow or SQLite; None if it is not one."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRORS:
        return os.strerror(e.errno)
    text = str(e)
    for code in STORAGE_ERRORS:  # pyarrow raises OSError without errno, the reason in its message
        if os.strerror(code) in text:
            return os.strerror(code)
    return next((reason for msg, reason in SQLITE_STORAGE.items() if msg in text), None)


def _fail(message: str):
    from rich.markup import escape

    from distill.core.progress import console

    # the message is the user's own text (keys, values, paths): "[step one]" must print as written
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _stages(
    recipe_path: Path, overrides, stages: tuple[str, ...], force: bool, resume: bool = True, allow_partial: bool = False
) -> None:
    from distill.config import load_recipe

    def go():
        set_env_defaults()
        recipe = load_recipe(recipe_path, overrides or [])
        from distill.pipeline import needs_estimate, run

        estimate = None
        if needs_estimate(recipe, stages):  # the plan before the first call, for the report's estimate vs actual
            from distill.plan import estimate_totals

            estimate = estimate_totals(recipe)
        result = run(recipe, stages, force, resume, allow_partial, estimate)
        gen = result.stages.get("generate")
        if gen is not None and gen.metrics.get("failed_rows"):  # went on (--allow-partial), still partial
            from distill.teachers.budget import PartialRun

            raise PartialRun.from_metrics(gen.metrics, allowed=True)

    _guard(go)


PARTIAL_EPILOG = (
    "Exit codes: 0 done; 2 a problem to fix (one error line); 3 partial: the teacher failed on some rows "
    "(retries spent), they count in no accuracy and train nothing, and running the same command again "
    "retries only them."
)


@app.command(epilog=PARTIAL_EPILOG + " `run` stops after generate then, unless --allow-partial.")
def run(
    recipe: RecipeArg,
    overrides: Overrides = None,
    force: Force = False,
    resume: Resume = True,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="when the teacher failed on some rows, train on the rows that succeeded instead of stopping "
            "after generate (the report says the run is partial; the exit code is still 3)",
        ),
    ] = False,
) -> None:
    """Run the whole pipeline: generate → train → export → evaluate → report."""
    _stages(recipe, overrides, ("generate", "train", "export", "evaluate"), force, resume, allow_partial)


@app.command(epilog=PARTIAL_EPILOG)
def generate(recipe: RecipeArg, overrides: Overrides = None, force: Force = False) -> None:
    """Teacher writes rationales for the task's problems (Ray workers); writes Parquet shards."""
    _stages(recipe, overrides, ("generate",), force)


@app.command("plan")
def plan_command(
    recipe: RecipeArg,
    overrides: Overrides = None,
    pilot: Annotated[
        int,
        typer.Option(
            "--pilot",
            min=0,
            help="first run the teacher on N train problems (cached: the real run reuses them) and scale what "
            "they measured: output tokens, stage-2 share, throughput",
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON object instead of the table")] = False,
) -> None:
    """What the teacher will cost before any call: per step, calls, cache hits, tokens, cost and time.

    Without --pilot nothing is paid and no weights load (the teacher's tokenizer only)."""

    def go():
        set_env_defaults()
        from distill.config import load_recipe
        from distill.plan import plan, print_plan

        result = plan(load_recipe(recipe, overrides or []), pilot)
        if as_json:
            print(json.dumps(result, indent=2, ensure_ascii=False))
        else:
            print_plan(result)

    _guard(go)


@app.command()
def train(recipe: RecipeArg, overrides: Overrides = None, force: Force = False, resume: Resume = True) -> None:
    """Fine-tune the student on the generated dataset (a killed run resumes from its checkpoint)."""
    _stages(recipe, overrides, ("train",), force, resume)


@app.command()
def export(recipe: RecipeArg, overrides: Overrides = None, force: Force = False) -> None:
    """Export the trained student to ONNX (KV cache) and quantize it."""
    _stages(recipe, overrides, ("export",), force)


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    overrides: Overrides = None,
    force: Force = False,
    split: Annotated[
        str, typer.Option(help="eval (held-out, writes the report), train, or a .jsonl/.json/.log task file")
    ] = "eval",
) -> None:
    """Evaluate teacher and students (greedy, 95% CI, per-example outputs saved) on a split."""
    if split == "eval":
        _stages(recipe, overrides, ("evaluate",), force)
        return

    def go():
        set_env_defaults()
        from distill.config import load_recipe
        from distill.pipeline import evaluate_split
        from distill.stages.report import print_table

        folder = evaluate_split(load_recipe(recipe, overrides or []), split, force).dir
        print_table(json.loads((folder / "scores.json").read_text()), {})
        print(folder)

    _guard(go)


@app.command()
def ablate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    formats: Annotated[
        str, typer.Option(help="comma-separated student formats: label, rationale, multitask, kd, on_policy")
    ] = "label,rationale,multitask,kd,on_policy",
    force: Force = False,
    resume: Resume = True,
) -> None:
    """Train label-only, rationale, multitask, logit-KD and on-policy students on the same data; one table."""

    def go():
        set_env_defaults()
        from distill.config import load_recipe

        r = load_recipe(recipe, overrides or [])
        from distill.ablate import ablate as run_ablation

        command = " ".join(["distill ablate", str(recipe), *(overrides or []), "--formats", formats])
        fmts = tuple(f.strip() for f in formats.split(",") if f.strip())
        table = run_ablation(r, fmts, force, resume, command=command)
        print(r.run_dir / "ablate" / "ablation.md")
        return table

    _guard(go)


@app.command()
def infer(
    bundle: Annotated[Path, typer.Argument(help="export bundle folder (runs/<name>/export/bundle)")],
    question: Annotated[str | None, typer.Argument(help="the question to answer (or give --input)")] = None,
    input_file: Annotated[
        str | None,
        typer.Option("--input", help="file of questions, one a line (blank lines skipped); - reads stdin"),
    ] = None,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help='print {"question": ..., "answer": ...} lines instead of answers')
    ] = False,
    model_file: Annotated[
        str | None, typer.Option(help="ONNX file inside the bundle (default: the bundle's choice)")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="tokens to generate at most (default: the bundle's max_new_tokens)")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 decodes greedily; above 0 samples")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass (with --temperature)")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the sampling; the same seed gives the same answers")] = 0,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="cut a prompt past the model's context to its last tokens that fit")
    ] = False,
    calculator: Annotated[
        bool | None,
        typer.Option(
            "--calculator/--no-calculator",
            help="write the value of each arithmetic expression the model ends with '=' (default: as the bundle "
            "was exported, student.calculator)",
        ),
    ] = None,
) -> None:
    """Answer questions with an exported bundle through onnxruntime (no torch).

    One QUESTION prints its answer; --input prints one answer a line (line breaks inside an answer
    become spaces; --jsonl keeps the exact text). A prompt past the model's context is refused
    before decoding, or cut with --truncate."""

    def go():
        set_env_defaults()
        from distill.export.runtime import (
            GENERATION_FILE,
            BundleFormatError,
            OnnxGenerator,
            RequestError,
            check_format,
        )

        questions, where = _infer_questions(question, input_file)
        if not (bundle / GENERATION_FILE).is_file():
            raise DistillError(
                f"{bundle} is not an export bundle (no {GENERATION_FILE})", "pass runs/<name>/export/bundle"
            )
        try:
            meta = json.loads((bundle / GENERATION_FILE).read_text())
            check_format(meta, bundle)
            name = model_file or meta["model_file"]
            if not (bundle / name).is_file():
                raise DistillError(
                    f"{bundle / name} does not exist", "pick an .onnx file inside the bundle with --model-file"
                )
            gen = OnnxGenerator(bundle, name)
            new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
            for q, label in zip(questions, where):
                try:
                    gen.encode(q, new, truncate)  # every question checked before any is decoded
                except RequestError as e:
                    raise DistillError(f"{label}{e.problem}", e.fix) from None
            answers = gen.generate(
                questions, new, 8, temperature, top_p, seed, truncate=truncate, calculator=calculator
            )
        except (BundleFormatError, RequestError) as e:
            raise DistillError(e.problem, e.fix) from None
        for q, a in zip(questions, answers):
            if jsonl:
                print(json.dumps({"question": q, "answer": a}, ensure_ascii=False))
            else:
                print(a if input_file is None else " ".join(a.splitlines()))

    _guard(go)


def _infer_questions(question: str | None, input_file: str | None) -> tuple[list[str], list[str]]:
    """The questions ``infer`` answers and, for each, how an error names it ("" for a lone question,
    "<file> line N: " for --input); blank lines of a file are skipped, not answered."""
    if (question is None) == (input_file is None):
        raise DistillError(
            "infer takes one question or --input, not " + ("both" if question is not None else "neither"),
            "pass a QUESTION argument, or --input FILE (one question a line, - for stdin)",
        )
    if input_file is None:
        return [question], [""]
    name = "stdin" if input_file == "-" else input_file
    if input_file == "-":
        text = sys.stdin.read()
    elif not Path(input_file).is_file():
        raise DistillError(f"--input {input_file} does not exist", "pass a text file of questions, one a line")
    else:
        text = Path(input_file).read_text(encoding="utf-8")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DistillError(f"{name} holds no questions", "write one question a line")
    return [line for _, line in lines], [f"{name} line {n}: " for n, _ in lines]


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="teacher model source: embedded:/hf:/gguf:")],
    host: Annotated[str, typer.Option(help="address to bind; not loopback needs a token")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    token_env: Annotated[
        str, typer.Option(help="environment variable holding the token clients must send as their API key")
    ] = "DISTILL_SERVE_TOKEN",
    name: Annotated[str | None, typer.Option(help="served model name (default: the model's identity)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    max_batch: Annotated[int, typer.Option(min=1, help="requests generated together")] = 32,
    batch_window_ms: Annotated[float, typer.Option(min=0, help="how long to gather a batch")] = 10.0,
    # Test-facing faults of the Batch API (hidden): batches that expire, lines that fail, batches that wait.
    batch_expire_after: Annotated[
        int, typer.Option(min=0, hidden=True, help="a batch expires after answering this many lines (0 = never)")
    ] = 0,
    batch_fail_lines: Annotated[
        str, typer.Option(hidden=True, help="HTTP statuses the first batch lines get, comma-separated (500,400)")
    ] = "",
    batch_start_delay: Annotated[
        float, typer.Option(min=0, hidden=True, help="seconds a new batch stays validating before it runs")
    ] = 0.0,
    batch_faults_control: Annotated[
        bool, typer.Option(hidden=True, help="let tests set these faults while serving: POST /_batch_faults")
    ] = False,
) -> None:
    """Serve a local teacher as an OpenAI-compatible endpoint (chat, completions, files and batches)."""

    def go():
        set_env_defaults()
        from distill.core.progress import console
        from distill.teachers.serve import serve as run_server

        def ready(server):
            console.print(
                f"serving [bold]{server.name}[/] on http://{host}:{port}/v1 "
                f"({'token required' if server.token else 'no token: loopback only'})",
                highlight=False,
                soft_wrap=True,
            )

        if dtype not in ("float32", "bfloat16"):
            raise DistillError(f"--dtype {dtype} is not supported", "use float32 or bfloat16")
        from distill.teachers.serve import BatchFaults

        statuses = [s.strip() for s in batch_fail_lines.split(",") if s.strip()]
        if not all(s.isdigit() and 100 <= int(s) <= 599 for s in statuses):
            raise DistillError(f"--batch-fail-lines {batch_fail_lines} is not a list of HTTP statuses", "e.g. 500,400")
        faults = BatchFaults(batch_expire_after, tuple(int(s) for s in statuses), batch_start_delay)
        run_server(
            model,
            host,
            port,
            token_env,
            name,
            dtype,
            max_batch,
            batch_window_ms,
            on_ready=ready,
            faults=faults,
            faults_control=batch_faults_control,
        )

    _guard(go)


jobs_app = typer.Typer(no_args_is_help=True, help="Generation jobs: queue, watch, pause, resume, cancel.")
app.add_typer(jobs_app, name="jobs")

Store = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="job store file (default: $DISTILL_JOB_STORE, else the nearest .distill/jobs.sqlite from here up)",
    ),
]


@jobs_app.command("submit")
def jobs_submit(
    recipe: RecipeArg,
    overrides: Overrides = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (default: a local cluster); http://HEAD:8265 (the dashboard) sends the job "
            "to the cluster through Ray's Jobs API: it runs there, not in the local queue"
        ),
    ] = None,
    store: Store = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what the job would cost (`distill plan`) and submit nothing")
    ] = False,
    priority: Annotated[int, typer.Option(help="queue order: higher starts first (same priority: oldest first)")] = 0,
    after: Annotated[
        list[str] | None, typer.Option("--after", help="start only once this job is done (repeatable)")
    ] = None,
) -> None:
    """Queue the generate stage of a recipe; prints the job id at once. The queue's scheduler starts it
    when fewer than `distill jobs queue --max-running` jobs run and its --after jobs are done."""

    def go():
        set_env_defaults()
        if dry_run:
            from distill.config import load_recipe
            from distill.plan import plan, print_plan

            print_plan(plan(load_recipe(recipe, overrides or [])))
            return
        from distill.jobs import store_path, submit

        path = store_path(store)
        print(submit(recipe, overrides or [], address, path, priority=priority, after=after or []))
        if path.absolute().parent.parent != Path.cwd().absolute():  # found above here, or chosen: say where
            print(f"job recorded in {path}", file=sys.stderr)

    _guard(go)


@jobs_app.command("list")
def jobs_list(store: Store = None) -> None:
    """All jobs, newest last: id, state, name, overrides, when submitted, rows done."""

    def go():
        import shutil

        from distill.jobs import JobStore, list_lines, store_path, sync_ray_jobs, wake

        path = store_path(store)
        if path.exists():  # listing never creates a store
            js = JobStore(path)
            wake(js)  # a scheduler killed with jobs still queued is started again
            sync_ray_jobs(js)  # jobs on a Ray cluster: what the cluster says now
            jobs = js.all()
        else:
            jobs = []
        width = shutil.get_terminal_size((80, 24)).columns
        print("\n".join(list_lines(jobs, width)) if jobs else f"no jobs in {path}")

    _guard(go)


@jobs_app.command("status")
def jobs_status(job_id: str, store: Store = None) -> None:
    """Rows done / failed / remaining, tokens, estimated cost and rate, runner pid, elapsed time and ETA."""

    def go():
        from distill.jobs import JobStore, status_lines, store_path, sync_ray_job, timing_lines, wake

        js = JobStore(store_path(store), create=False)
        job = sync_ray_job(js, job_id)  # a job on a Ray cluster: its status there; any other as stored
        wake(js)
        print("\n".join(status_lines(job, jobs=js.all()) + timing_lines(job)))

    _guard(go)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, store: Store = None) -> None:
    """Stop a running job, or take a queued one off the queue; committed rows and cached completions are
    kept for `resume`."""

    def go():
        from distill.jobs import cancel, status_lines, store_path

        print("\n".join(status_lines(cancel(job_id, store_path(store)))))

    _guard(go)


@jobs_app.command("pause")
def jobs_pause(job_id: str, store: Store = None) -> None:
    """Hold a job: a queued one does not start, a running one stops (rows kept) and waits; `resume` releases it."""

    def go():
        from distill.jobs import pause, status_lines, store_path

        print("\n".join(status_lines(pause(job_id, store_path(store)))))

    _guard(go)


@jobs_app.command("resume")
def jobs_resume(job_id: str, store: Store = None) -> None:
    """Put a paused, cancelled, failed or budget-stopped job back in the queue; it continues where it stopped."""

    def go():
        set_env_defaults()
        from distill.jobs import resume, store_path

        resume(job_id, store_path(store))
        print(job_id)

    _guard(go)


@jobs_app.command("queue")
def jobs_queue(
    max_running: Annotated[
        int | None, typer.Option("--max-running", min=1, help="how many jobs may run at once (kept in the store)")
    ] = None,
    store: Store = None,
) -> None:
    """The queue: the limit on jobs running at once, what runs, and what waits in which order and why."""

    def go():
        from distill.jobs import JobStore, queue_lines, store_path, wake

        js = JobStore(store_path(store), create=max_running is not None)
        if max_running is not None:
            js.set_max_running(max_running)
        wake(js)
        print("\n".join(queue_lines(js)))

    _guard(go)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    lines: Annotated[int, typer.Option("-n", min=1, help="how many of the last lines to show")] = 40,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="keep printing what is appended until the job ends")
    ] = False,
    store: Store = None,
) -> None:
    """The last lines of a job's log; with -f, then everything appended until the job is done, failed,
    partial, budget-stopped or cancelled (exit 0). Ctrl-C stops following (exit 130), not the job."""

    def go():
        from distill.jobs import JobStore, ray_job_logs, store_path

        jobs = JobStore(store_path(store), create=False)
        job = jobs.get(job_id)
        if follow:
            _follow(jobs, job_id, lines, ray=bool(job.get("ray_job_id")))
            return
        if job.get("ray_job_id"):  # kept by the cluster (Ray's get_job_logs)
            text = ray_job_logs(jobs, job_id).splitlines()
        else:
            log = Path(job["log"])
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
        print("\n".join(text[-lines:]))

    _guard(go)


def _follow(jobs, job_id: str, lines: int, ray: bool = False) -> None:
    """``jobs logs -f``: follow until the job ends; Ctrl-C or a closed pipe ends it quietly."""
    from distill.jobs import follow_log, follow_ray_log

    try:
        (follow_ray_log if ray else follow_log)(jobs, job_id, lines)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on (`distill jobs cancel {job_id}` stops it)", file=sys.stderr)
        raise typer.Exit(130) from None
    except BrokenPipeError:  # `distill jobs logs -f ID | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


recipe_app = typer.Typer(no_args_is_help=True, help="Recipe keys: every setting with its type, default and meaning.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("keys")
def recipe_keys_command(
    section: Annotated[
        str | None, typer.Argument(help="only this section's keys, e.g. task, student or student.kd")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON list of {key, type, default, required, description}")
    ] = False,
) -> None:
    """Every recipe key (dotted, as overrides write it) with its type, default and description.

    Read from the recipe's config models, so the list is always the one validation uses; the keys of
    an optional section (student.on_policy.*) show the defaults they take once the section is set."""

    def go():
        from distill.config import recipe_keys

        rows = recipe_keys(section or "")
        print(json.dumps(rows, indent=2, ensure_ascii=False) if as_json else "\n".join(_key_lines(rows)))

    _guard(go)


def _key_lines(rows: list[dict]) -> list[str]:
    """``recipe keys`` for a terminal: per key, the key, type and default (as YAML) on one line and the
    description indented below it, wrapped to the terminal (at most 100 columns); a section's row
    comes after a blank line and shows no default (its keys below do)."""
    import shutil
    import textwrap

    import yaml

    width = max(40, min(shutil.get_terminal_size().columns, 100))
    wrap = dict(width=width, break_long_words=False, break_on_hyphens=False)
    lines: list[str] = []
    for r in rows:
        head = f"{r['key']}  {r['type']}"
        if r["required"]:
            head += "  (required)"
        elif not isinstance(r["default"], dict) or not r["type"].startswith("section"):
            shown = yaml.safe_dump(
                r["default"], default_flow_style=True, sort_keys=False, allow_unicode=True, width=1e9
            )
            head += "  (default: " + shown.removesuffix("...\n").strip() + ")"
        if lines and "section" in r["type"]:
            lines.append("")
        lines += textwrap.wrap(head, subsequent_indent=" " * 8, **wrap)
        lines += textwrap.wrap(r["description"], initial_indent=" " * 4, subsequent_indent=" " * 4, **wrap)
    return lines


data_app = typer.Typer(
    no_args_is_help=True, help="A run's generated data: export it for other trainers, inspect every row."
)
app.add_typer(data_app, name="data")

RunDir = Annotated[Path, typer.Argument(help="run folder (runs/<name>) or its generate folder")]


@data_app.command("export")
def data_export(
    run_dir: RunDir,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf (datasets.load_from_disk), messages (TRL SFTTrainer), sharegpt (Axolotl, LLaMA-Factory) or alpaca",
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", help="folder to write (default: <run>/data/<format>)")] = None,
    split: Annotated[str, typer.Option(help="train (the rows the student trains on), eval, or all")] = "all",
    force: Annotated[bool, typer.Option("--force", help="replace the --out folder if it exists")] = False,
) -> None:
    """Export the teacher's rows as chat data other trainers read, each row with its provenance.

    Train rows: the question as the user turn, the exact target the student trains on as the
    assistant turn. Eval rows: the teacher's answer as the assistant turn (`correct` says if it is
    right; none when it gave no answer). Written atomically: a failure leaves nothing behind."""

    def go():
        set_env_defaults()  # offline before datasets is imported
        from distill.core.progress import console
        from distill.data.export import export_data, summary_line

        result = export_data(run_dir, fmt, out, split, force)
        console.print(summary_line(result), highlight=False, soft_wrap=True, markup=False)

    _guard(go)


@data_app.command("inspect")
def data_inspect(
    run_dir: RunDir,
    out: Annotated[
        Path | None, typer.Option("--out", help="HTML file to write (default: <run>/generate/inspect.html)")
    ] = None,
) -> None:
    """Write one self-contained HTML page showing every generated row and what became of it."""

    def go():
        from distill.data.inspect import write_inspect_page

        print(write_inspect_page(run_dir, out))

    _guard(go)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
