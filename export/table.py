"""The variant table, rendered one way for every reader: the export stage's console, the model card
(``bundle/README.md``) and the run report. Rows come from ``gate.VariantResult`` objects or from the
variant dicts of an export ``metrics.json`` (older runs' dicts may lack ``lost``/``gained``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from distill.export.gate import VariantResult, changes_cell

COLUMNS = (
    "variant",
    "size",
    "size / fp32",
    "top-1 vs torch",
    "accuracy",
    "vs fp32 (problems)",
    "tokens/s (1 thread)",
    "kept",
)
# The same columns under short labels: the console is often 80 columns wide (job logs, CI).
SHORT_COLUMNS = ("variant", "size", "/ fp32", "top-1", "accuracy", "vs fp32", "tok/s", "kept")
CAPTION = (
    "top-1 vs torch: next-token agreement with the torch student on the verify prompts; "
    "vs fp32: eval problems lost / gained against fp32; tokens/s: greedy decoding, batch 1, 1 thread"
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
        f"{tps:.0f}" if tps else NONE,
        "✓" if r.get("chosen") else "",
    ]


def variant_table(variants: Iterable[VariantResult | Mapping]) -> tuple[list[str], list[list[str]]]:
    """(column headers, one list of cell strings per variant, in the given order); "—" where a value
    is missing (not gated, failed variant, an older run's dict)."""
    rows = [_as_dict(v) for v in variants]
    fp32_bytes = next((r.get("bytes") for r in rows if r.get("preset") == "fp32"), None)
    return list(COLUMNS), [_cells(r, fp32_bytes) for r in rows]


def variant_markdown(variants: Iterable[VariantResult | Mapping]) -> str:
    """The variant table as a markdown table followed by its caption line."""
    headers, rows = variant_table(variants)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows), "", CAPTION + "."]
    return "\n".join(lines) + "\n"


def variant_rich_table(variants: Iterable[VariantResult | Mapping], title: str = "export variants"):
    """The variant table as a ``rich.table.Table`` (for ``console.print``)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    _, rows = variant_table(variants)
    table = Table(title=title, caption=CAPTION, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for h in SHORT_COLUMNS:
        if h == "accuracy":  # holds a failed variant's error: folded onto more lines, never squeezing the rest
            table.add_column(h, max_width=24, overflow="fold")
        else:
            table.add_column(h, no_wrap=True, min_width=len(h))
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # plain text: an error message may hold "[...]"
    return table
