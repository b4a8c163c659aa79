"""The variant table, rendered one way for every reader: the export stage's console, the model card
(``bundle/README.md``) and the run report. Rows come from ``gate.VariantResult`` objects or from the
variant dicts of an export ``metrics.json`` (older runs' dicts may lack ``lost``/``gained``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from distill.export.gate import VariantResult, changes_cell, points

COLUMNS = (
    "variant",
    "size",
    "size / fp32",
    "top-1 vs torch",
    "accuracy",
    "vs fp32 (problems)",
    "gap, 95% CI (points)",
    "tokens/s (1 thread)",
    "first token (ms)",
    "peak RSS",
    "kept",
)
# The same columns under short labels: the console is often 80 columns wide (job logs, CI).
# The console drops the size ratio, latency and memory, and shows only the gap's interval (the
# markdown has them all).
SHORT_COLUMNS = ("variant", "size", "top-1", "accuracy", "vs fp32", "95% CI", "tok/s", "kept")
_SHORT_CELLS = (0, 1, 3, 4, 5, 6, 7, 10)  # which of COLUMNS the console shows
CAPTION = (
    "top-1 vs torch: next-token agreement with the torch student on the verify prompts; "
    "vs fp32: gate problems lost / gained against fp32; gap: accuracy difference to fp32 with its paired "
    "95% interval (Tango); tokens/s: greedy decoding, 1 thread"
)
CAPTION_FULL = (
    CAPTION + "; first token: prompt to first new token, batch 1; peak RSS: the process that scored the variant alone"
)
NONE = "—"


def _as_dict(variant: VariantResult | Mapping) -> Mapping:
    return variant.row() if isinstance(variant, VariantResult) else variant


def _cells(r: Mapping, fp32_bytes: int | None) -> list[str]:
    size = r.get("bytes") or 0
    acc = r.get("accuracy")
    if acc is None:
        accuracy = r.get("error") or NONE
    elif r.get("correct") is not None and r.get("n"):
        accuracy = f"{acc:.1%} ({r['correct']}/{r['n']})"
    else:
        accuracy = f"{acc:.1%}"
    top1 = r.get("top1_agreement")
    tps = r.get("tokens_per_second")
    return [
        str(r.get("preset", NONE)),
        f"{size / 1e6:.1f} MB" if size else NONE,
        f"{size / fp32_bytes:.3f}" if size and fp32_bytes else NONE,
        f"{top1:.1%}" if top1 is not None else NONE,
        accuracy,
        changes_cell(r.get("preset", ""), r.get("lost"), r.get("gained")),
        _gap_cell(r),
        f"{tps:.0f}" if tps else NONE,
        f"{r['first_token_ms']:.0f}" if r.get("first_token_ms") else NONE,
        f"{r['peak_rss_bytes'] / 1e6:.0f} MB" if r.get("peak_rss_bytes") else NONE,
        "✓" if r.get("chosen") else "",
    ]


def _gap_cell(r: Mapping) -> str:
    """``−0.5 (−2.1…+1.1)`` in points; "—" for fp32 and rows without an interval (older runs)."""
    low, high = r.get("gap_low"), r.get("gap_high")
    if r.get("preset") == "fp32" or low is None or high is None or not r.get("n"):
        return NONE
    gap = (r["gained"] - r["lost"]) / r["n"] * 100
    return f"{points(gap)} ({points(low * 100)}…{points(high * 100)})"


def decision_lines(variants: Iterable[VariantResult | Mapping]) -> list[str]:
    """The gate's sentence for each variant it judged (kept, not shown within tolerance, rejected early)."""
    return [f"- {d['decision']}" for d in map(_as_dict, variants) if d.get("decision") and d.get("preset") != "fp32"]


def variant_table(variants: Iterable[VariantResult | Mapping]) -> tuple[list[str], list[list[str]]]:
    """(column headers, one list of cell strings per variant, in the given order); "—" where a value
    is missing (not gated, failed variant, an older run's dict)."""
    rows = [_as_dict(v) for v in variants]
    fp32_bytes = next((r.get("bytes") for r in rows if r.get("preset") == "fp32"), None)
    return list(COLUMNS), [_cells(r, fp32_bytes) for r in rows]


def variant_markdown(variants: Iterable[VariantResult | Mapping]) -> str:
    """The variant table as a markdown table followed by its caption line and the gate's decisions."""
    variants = list(variants)
    headers, rows = variant_table(variants)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows), "", CAPTION_FULL + "."]
    decisions = decision_lines(variants)
    if decisions:
        lines += ["", "Gate (a variant is kept when its interval's lower end is within the tolerance):", *decisions]
    return "\n".join(lines) + "\n"


def variant_rich_table(variants: Iterable[VariantResult | Mapping], title: str = "export variants"):
    """The variant table as a ``rich.table.Table`` (for ``console.print``)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    _, rows = variant_table(variants)
    for r in rows:  # the gap is lost / gained over n: the console shows only its interval
        r[6] = r[6].split("(")[-1].rstrip(")")
    rows = [[r[i] for i in _SHORT_CELLS] for r in rows]
    table = Table(title=title, caption=CAPTION, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for h in SHORT_COLUMNS:
        if h == "accuracy":  # holds a failed variant's error: folded onto more lines, never squeezing the rest
            table.add_column(h, max_width=24, overflow="fold")
        else:
            table.add_column(h, no_wrap=True, min_width=len(h))
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # plain text: an error message may hold "[...]"
    return table
