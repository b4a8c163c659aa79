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
    """Run ``fn``; a DistillError becomes one red line on stderr and exit code 2."""
    try:
        return fn()
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
    from distill.core.progress import console

    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _stages(recipe_path: Path, overrides, stages: tuple[str, ...], force: bool, resume: bool = True) -> None:
    from distill.config import load_recipe

    def go():
        set_env_defaults()
        recipe = load_recipe(recipe_path, overrides or [])
        from distill.pipeline import run

        run(recipe, stages, force, resume)

    _guard(go)


@app.command()
def run(recipe: RecipeArg, overrides: Overrides = None, force: Force = False, resume: Resume = True) -> None:
    """Run the whole pipeline: generate → train → export → evaluate → report."""
    _stages(recipe, overrides, ("generate", "train", "export", "evaluate"), force, resume)


@app.command()
def generate(recipe: RecipeArg, overrides: Overrides = None, force: Force = False) -> None:
    """Teacher writes rationales for the task's problems (Ray workers); writes Parquet shards."""
    _stages(recipe, overrides, ("generate",), force)


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

        command = " ".join(["distill ablate", str(recipe), *(overrides or [])])
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
            answers = gen.generate(questions, new, 8, temperature, top_p, seed, truncate=truncate)
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
) -> None:
    """Serve a local teacher as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions)."""

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
        run_server(model, host, port, token_env, name, dtype, max_batch, batch_window_ms, on_ready=ready)

    _guard(go)


jobs_app = typer.Typer(no_args_is_help=True, help="Generation jobs: submit, watch, cancel, resume.")
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("submit")
def jobs_submit(
    recipe: RecipeArg,
    overrides: Overrides = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: a local cluster)")] = None,
) -> None:
    """Start the generate stage of a recipe in the background; prints the job id at once."""

    def go():
        set_env_defaults()
        from distill.jobs import submit

        print(submit(recipe, overrides or [], address))

    _guard(go)


@jobs_app.command("list")
def jobs_list() -> None:
    """All jobs, newest last."""

    def go():
        from distill.jobs import JobStore

        for job in JobStore().all():
            p = job["progress"]
            done = f"{p.get('rows', 0)}/{p['total']}" if p.get("total") else "-"
            print(f"{job['id']}  {job['state']:<9}  rows {done:<9}  {job['recipe']}")

    _guard(go)


@jobs_app.command("status")
def jobs_status(job_id: str) -> None:
    """Rows done / failed / remaining, tokens, estimated cost and rate of one job."""

    def go():
        from distill.jobs import JobStore, status_lines

        print("\n".join(status_lines(JobStore().get(job_id))))

    _guard(go)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Stop a running job; committed rows and cached completions are kept for `resume`."""

    def go():
        from distill.jobs import cancel, status_lines

        print("\n".join(status_lines(cancel(job_id))))

    _guard(go)


@jobs_app.command("resume")
def jobs_resume(job_id: str) -> None:
    """Continue a cancelled, failed or budget-stopped job where it stopped."""

    def go():
        set_env_defaults()
        from distill.jobs import resume

        resume(job_id)
        print(job_id)

    _guard(go)


@jobs_app.command("logs")
def jobs_logs(job_id: str, lines: Annotated[int, typer.Option("-n", min=1)] = 40) -> None:
    """The last lines of a job's log."""

    def go():
        from distill.jobs import JobStore

        log = Path(JobStore().get(job_id)["log"])
        text = log.read_text(errors="replace").splitlines() if log.exists() else []
        print("\n".join(text[-lines:]))

    _guard(go)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
