"""Stage 5 — report: ``report.md``, ``metrics.json`` and PNG plots in the run folder, table printed."""

from __future__ import annotations

import json
from pathlib import Path

from distill.core.artifacts import atomic_write_bytes, write_json, write_text


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2f} MB"


def accuracy_rows(scores: dict) -> list[tuple[str, str, str, str]]:
    """(model, accuracy, 95% CI, size) per evaluated model, in evaluation order."""
    rows = []
    for s in scores.values():
        lo, hi = s["ci95"]
        rows.append(
            (
                s["label"],
                f"{s['accuracy']:.1%} ({s['correct']}/{s['n']})",
                f"{lo:.1%}–{hi:.1%}",
                _fmt_bytes(s.get("bytes")),
            )
        )
    return rows


def partial_lines(stage_metrics: dict) -> list[str]:
    """The report's warning when the teacher failed on some rows: how many, the most common reasons,
    what the accuracies count, whether a student learned from the rest, and how to retry."""
    from distill.teachers.budget import failures_text

    gen = stage_metrics.get("generate", {})
    if not gen.get("failed_rows"):
        return []
    answered, total = gen.get("teacher_eval_n", 0), gen["eval_problems"]
    teacher = (
        f"the teacher's accuracy is on the {answered} of {total} eval problems it answered"
        if answered
        else f"the teacher answered none of the {total} eval problems, so it has no accuracy"
    )
    if "train" in stage_metrics:
        trained = (
            f"the student was trained on the {gen['train_rows_kept']} rationales kept from the rows that "
            "succeeded (`--allow-partial`)"
        )
    else:
        trained = "this run trained no student (`distill run` stops after generate unless `--allow-partial`)"
    return [
        f"**Partial run:** the teacher failed on {gen['failed_rows']} of {gen['problems']} rows, retries spent "
        f"({gen.get('failed_train_rows', '?')} train, {gen.get('failed_eval_rows', '?')} eval; "
        f"{failures_text(gen.get('failures', []), top=3)}). Failed rows count in no accuracy: {teacher}; "
        f"{trained}. Run the same command again to retry only the failed rows.",
        "",
    ]


def teacher_lines(gen: dict) -> list[str]:
    """With several teachers, a table of each one: problems asked, accuracy where there is gold, rows it
    wrote into the dataset and their share, tokens and cost, so a teacher's worth is next to its price."""
    if len(gen.get("teachers") or []) < 2:
        return []

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    lines = [
        "",
        f"Teachers (a question keeps {'the first kept rationale in list order' if gen.get('teachers_pick') == 'correct' else 'the rationale of the answer most teachers gave'}; "
        "an `unsolved` teacher is asked only what the teachers before it did not solve):",
        "",
        "| teacher | when | asked | train accuracy | eval accuracy | rows kept | share of dataset | tokens in | tokens out | cost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in gen["teachers"]:
        lines.append(
            f"| {t['name']} | {t['when']} | {t['asked']} | {pct(t['train_accuracy'])} | {pct(t['eval_accuracy'])} "
            f"| {t['train_rows_kept']} | {t['kept_share']:.0%} | {t['tokens_in']} | {t['tokens_out']} | {t['cost']:.4f} |"
        )
    return lines


def judge_lines(gen: dict) -> list[str]:
    """With a judge (teacher.judge): rows judged, the share at or above the threshold, unreadable verdicts,
    its tokens and cost apart from the teacher's, and the pairwise picks' outcomes when there were any."""
    j = gen.get("judge")
    if not j:
        return []
    rate = "—" if j["pass_rate"] is None else f"{j['pass_rate']:.0%}"
    lines = [
        "",
        f"Judge ({', '.join(dict.fromkeys(j['models']))}): {j['rows_judged']} train rows judged, {rate} of the scored "
        f"at or above the threshold, {j['unparsable']} with no readable score; {j['tokens_in']} tokens in, "
        f"{j['tokens_out']} out, cost {j['cost']:.4f} (paid now {j['paid_cost']:.4f}), apart from the teacher's.",
    ]
    p = j.get("pairwise")
    if p:
        o = p["outcomes"]
        lines.append(
            f"Pairwise picks ({p['debias']}): {p['pairs']} pairs, {p['calls']} calls; {o['x'] + o['y']} decided, "
            f"{o['tie']} ties; the first position named in {o['first_position']} of {o['orders']} answers."
        )
    return lines


def _plot_loss(losses: list[dict], path: Path, dev: list[dict] = (), best_step: int | None = None) -> None:
    """Training loss per step; with a dev split also the dev loss, and dev accuracy on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot([x["step"] + 1 for x in losses], [x["loss"] for x in losses], lw=1.2, label="train loss")  # after update k
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("completion loss")
    ax.set_title("student training" + (" (dev split)" if dev else ""))
    ax.grid(alpha=0.3)
    if dev:
        steps = [d["step"] for d in dev]
        ax.plot(steps, [d["dev_loss"] for d in dev], "o-", lw=1.2, ms=3, color="#cc6677", label="dev loss")
        acc = ax.twinx()
        acc.plot(
            steps, [100 * d["dev_accuracy"] for d in dev], "s-", lw=1.2, ms=3, color="#117733", label="dev accuracy"
        )
        acc.set_ylabel("dev accuracy (%)")
        acc.set_ylim(0, 100)
        if best_step is not None:
            ax.axvline(best_step, color="#999933", ls="--", lw=1, label=f"kept: step {best_step}")
        handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def training_lines(train: dict, dev: list[dict]) -> list[str]:
    """How the student trained and why it stopped; the dev curve as a table when there is one."""
    if not train:
        return []
    lines = [
        "",
        f"Student training: {train.get('steps')} optimizer steps on {train.get('examples')} examples, "
        f"stopped: {train.get('stop_reason') or 'the planned epochs were done'}."
        + (
            f" Kept step {train['best_step']} (dev accuracy {train['best_dev_accuracy']:.1%}, dev loss "
            f"{train['best_dev_loss']:.3f} on {train['dev_questions']} held-out training questions)."
            if "best_step" in train
            else ""
        ),
    ]
    if train.get("from_teacher"):
        ft = train["from_teacher"]
        lines += [
            "",
            f"Student built from the teacher (same tokenizer): {ft['student_parameters']:,} parameters vs "
            f"{ft['teacher_parameters']:,} ({ft['parameter_ratio']:.0%}); greedy decoding on one thread "
            f"{ft['student_tokens_per_second']:.1f} vs {ft['teacher_tokens_per_second']:.1f} tokens/s "
            f"({ft['speedup']:.1f}× the teacher's speed).",
        ]
    if train.get("on_policy"):
        op = train["on_policy"]
        lines += [
            "",
            f"On-policy distillation ({op['loss']}): {op['steps']} of {train.get('steps')} steps trained on the "
            f"student's own samples ({op['samples']} sampled, {op['sampled_tokens']:,} tokens); {op['scored']} scored "
            f"by the teacher, {op['cached']} of them from the cache; the teacher read {op['teacher_tokens']:,} new "
            f"tokens" + (f" (estimated cost {op['cost']:.2f})." if op.get("cost") else "."),
        ]
    if train.get("qat"):
        q = train["qat"]
        lay = q["layout"]
        blocks = ", ".join(f"{g} {b}" for g, b in lay["group_block_sizes"].items())
        line = (
            f"Quantization-aware phase: {q['steps']} more steps at lr {q['lr']:g} through the int4 export's grid "
            f"(blocks of {lay['block_size']}"
            + (f", {blocks}" if blocks else "")
            + f"; embedding int{lay['embed_bits']} "
            f"blocks of {lay['embed_block_size']}; "
            + ("int8 activations" if lay["activation_bits"] else "fp32 activations")
            + (f"; self-distillation weight {q['distill']:g}" if q["distill"] else "")
            + f"), mean step loss {q['first_loss']:.3f} over its first quarter, {q['final_loss']:.3f} over its last; "
            f"{q['seconds']:.0f} s."
        )
        if "dev_before" in q:
            line += (
                f" Dev accuracy through the int4 grid {q['dev_before']['dev_accuracy']:.1%} before the phase, "
                f"{q['dev_after']['dev_accuracy']:.1%} after."
            )
        lines += ["", line]
    if train.get("lr_sweep"):
        tried = ", ".join(f"{r['lr']:g} → {r['dev_loss']:.3f}" for r in train["lr_sweep"])
        steps = train["lr_sweep"][0]["steps"]
        lines += ["", f"Learning rate {train['lr']:g}, chosen by dev loss after {steps} steps per candidate ({tried})."]
    if dev:
        lines += ["", "| step | epoch | dev loss | dev accuracy | kept |", "|---|---|---|---|---|"]
        lines += [
            f"| {d['step']} | {d['epoch']:g} | {d['dev_loss']:.3f} | {d['dev_accuracy']:.1%} "
            f"({d['dev_correct']}/{d['dev_n']}) | {'✓' if d['step'] == train.get('best_step') else ''} |"
            for d in dev
        ]
    return lines


def _plot_models(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["label"] for s in scores.values()]
    acc = [100 * s["accuracy"] for s in scores.values()]
    err = [
        [100 * (s["accuracy"] - s["ci95"][0]) for s in scores.values()],
        [100 * (s["ci95"][1] - s["accuracy"]) for s in scores.values()],
    ]
    size = [(s.get("bytes") or 0) / 1e6 for s in scores.values()]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.barh(labels, acc, xerr=err, color="#4477aa", capsize=3)
    a1.set_xlabel("accuracy on held-out problems (%)")
    a1.set_xlim(0, 100)
    a2.barh(labels, size, color="#cc6677")
    a2.set_xlabel("model size (MB)")
    a2.set_yticklabels([])
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def estimate_rows(estimate: dict | None, gen: dict) -> list[str]:
    """The teacher calls' plan (made before the first call) beside what the generate stage counted."""
    if not estimate or not gen:
        return []
    actual = {
        "calls": gen.get("teacher_calls"),
        "tokens in": gen.get("tokens_in"),
        "tokens out": gen.get("tokens_out"),
        "cost": gen.get("paid_cost"),  # the plan's cost is what is to pay: cached rows are free in both
        "seconds": gen.get("seconds"),
    }
    planned = {
        "calls": estimate.get("calls"),
        "tokens in": estimate.get("tokens_in"),
        "tokens out": estimate.get("tokens_out"),
        "cost": estimate.get("cost"),
        "seconds": estimate.get("seconds"),
    }
    lines = ["", "Teacher calls, planned before the first one (`distill plan`) and counted:", ""]
    lines += ["| | estimate | actual | actual / estimate |", "|---|---|---|---|"]
    for key, e in planned.items():
        a = actual[key]
        fmt = (lambda x: f"{x:.4f}") if key == "cost" else (lambda x: f"{x:,.0f}")
        ratio = f"{a / e:.2f}" if e and a is not None else "—"
        lines.append(f"| {key} | {'—' if e is None else fmt(e)} | {'—' if a is None else fmt(a)} | {ratio} |")
    if gen.get("cached_rows"):
        lines.append(
            f"\n{gen['cached_rows']} rows came from the completion cache: their calls and tokens are in both columns, "
            "their cost in neither."
        )
    return lines


def write_report(
    run_dir: Path, recipe: dict, stage_seconds: dict, stage_metrics: dict, scores: dict, estimate: dict | None = None
) -> str:
    """Write report.md, metrics.json and plots; returns the markdown. ``estimate``: the plan of the teacher's
    calls made before the first one, shown beside the generate stage's counts."""
    plots = run_dir / "plots"
    loss_file = run_dir / "train" / "loss.json"
    dev_file = run_dir / "train" / "dev.json"
    dev = json.loads(dev_file.read_text()) if dev_file.exists() else []
    lines = [f"# distill run `{recipe['name']}`", ""]
    lines += partial_lines(stage_metrics)
    lines += ["| model | accuracy | 95% CI | size |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in accuracy_rows(scores)]
    if recipe.get("student", {}).get("calculator"):
        lines += [
            "",
            "Students decode with the calculator (`student.calculator`): after a student writes an arithmetic "
            "expression and `=`, the value is written for it; the teacher decodes alone.",
        ]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stage_seconds.items()]
    gen = stage_metrics.get("generate", {})
    if gen:
        lines += [
            "",
            f"Teacher `{gen.get('teacher_model')}`: kept {gen.get('train_rows_kept')} of {gen.get('train_problems')} "
            f"train rationales (correct answers only), {gen.get('tokens_out')} tokens generated, "
            f"{gen.get('cached_rows')} rows served from the cache"
            + (f", {gen['failed_rows']} rows FAILED." if gen.get("failed_rows") else "."),
        ]
        lines += teacher_lines(gen)
        lines += judge_lines(gen)
        lines += estimate_rows(estimate, gen)
    lines += training_lines(stage_metrics.get("train", {}), dev)
    exp = stage_metrics.get("export", {})
    if exp:
        from distill.export.table import variant_markdown

        v = exp.get("fp32_verify", {})
        lines += [
            "",
            f"ONNX fp32: max |logit − torch| {v.get('max_abs_logit_error', float('nan')):.2e}, greedy outputs identical "
            f"{v.get('greedy_identical')}/{v.get('prompts')}. Kept variant: **{exp['chosen']}** "
            f"(size ratio to fp32 {exp['chosen_fp32_size_ratio']:.2f}, tolerance {exp['tolerance']:.0%}).",
            "",
            variant_markdown(exp["variants"]).rstrip(),
        ]
        from distill.export.sensitivity import markdown_table

        if exp.get("sensitivity"):
            lines += ["", markdown_table(exp["sensitivity"], "int8_static").rstrip()]
        if exp.get("int4_mixed"):
            mixed = exp["int4_mixed"]
            lines += [
                "",
                f"`int4_mixed` keeps {', '.join(mixed['int8_groups']) or 'no group'} in int8 "
                f"(+{mixed['int8_extra_bytes'] / 1e6:.1f} MB over int4, budget {mixed['max_bytes'] / 1e6:.0f} MB).",
                "",
                markdown_table(mixed["sweep"], "int4").rstrip(),
            ]
    if loss_file.exists():
        best = stage_metrics.get("train", {}).get("best_step")
        _plot_loss(json.loads(loss_file.read_text()), plots / "loss.png", dev, best)
        lines += ["", "![training loss" + (" and dev curve" if dev else "") + "](plots/loss.png)"]
    if scores:
        _plot_models(scores, plots / "models.png")
        lines += ["", "![accuracy and size per model](plots/models.png)"]
    md = "\n".join(lines) + "\n"
    write_text(run_dir / "report.md", md)
    write_json(run_dir / "metrics.json", {"scores": scores, "stage_seconds": stage_seconds, "stages": stage_metrics})
    return md


def print_table(scores: dict, stage_seconds: dict) -> None:
    from rich.table import Table

    from distill.core.progress import console

    table = Table(title="held-out accuracy")
    for col in ("model", "accuracy", "95% CI", "size"):
        table.add_column(col)
    for row in accuracy_rows(scores):
        table.add_row(*row)
    console.print(table)
    if stage_seconds:
        console.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
