"""Per-group quantization sensitivity: quantize one group of MatMuls at a time (every ``q``, every
``down``, ... across all layers), run the calibration prompts through the prefill path and measure
top-1 agreement of the logits with the fp32 model. Groups that lose the most agreement alone are
the ones presets keep in higher precision.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def prefill_top1(model_path: Path, feeds: list[dict]) -> list[np.ndarray]:
    """Argmax token at every position of every feed (prefill, 1 thread)."""
    from distill.export.runtime import make_session

    sess = make_session(model_path, threads=1)
    return [sess.run(["logits"], feed)[0][0].argmax(-1) for feed in feeds]


def top1_agreement(model_path: Path, feeds: list[dict], reference: list[np.ndarray]) -> float:
    """Fraction of positions whose argmax equals ``reference``'s (teacher-forced, prefill)."""
    got = prefill_top1(model_path, feeds)
    same = sum(int((g == r).sum()) for g, r in zip(got, reference))
    return same / sum(len(r) for r in reference)


def group_sensitivity(
    fp32: Path,
    builders: dict[str, Callable[[Path, Path], object]],
    feeds: list[dict],
    reference: list[np.ndarray] | None = None,
) -> list[dict]:
    """One row per group: top-1 agreement with fp32 and file size of the model ``builders[group]``
    writes (``builder(fp32, dst)`` quantizes that group only; a group named ``all`` quantizes
    everything). Sorted most sensitive first, ``all`` last."""
    import os

    reference = reference if reference is not None else prefill_top1(fp32, feeds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill_sens_") as tmp:
        for name, build in builders.items():
            out = Path(tmp) / f"{name}.onnx"
            build(fp32, out)
            size = os.path.getsize(out) + (os.path.getsize(f"{out}.data") if Path(f"{out}.data").exists() else 0)
            rows.append({"group": name, "bytes": size, "top1_agreement": top1_agreement(out, feeds, reference)})
            for f in Path(tmp).iterdir():
                f.unlink()
    solo = sorted((r for r in rows if r["group"] != "all"), key=lambda r: r["top1_agreement"])
    return solo + [r for r in rows if r["group"] == "all"]


def static_int8_sweep(
    fp32: Path,
    calib: list[dict],
    held_out: list[dict],
    calibrate_method: str = "MinMax",
    embed_block_size: int = 64,
) -> list[dict]:
    """The per-group sweep of int8_static: each projection group of ``quantize.linear_groups`` alone
    (ranges calibrated on ``calib``), the tied embedding / LM head alone (blockwise int8 of
    ``embed_block_size``), then everything; top-1 agreement with fp32 on ``held_out``. Returns the
    rows of ``group_sensitivity``."""
    from functools import partial

    from distill.export.quantize import linear_groups, quantize_static_int8, quantize_weight_only

    groups = linear_groups(fp32)
    builders: dict[str, Callable[[Path, Path], object]] = {
        g: partial(
            quantize_static_int8, feeds=calib, only=nodes, calibrate_method=calibrate_method, embed_block_size=None
        )
        for g, nodes in groups.items()
    }
    # weight-only pass with every MatMul excluded: only the tied embedding / LM head gets quantized
    every = [n for nodes in groups.values() for n in nodes]
    builders["embedding+lm_head"] = partial(quantize_weight_only, bits=8, block_size=embed_block_size, exclude=every)
    builders["all"] = partial(
        quantize_static_int8, feeds=calib, calibrate_method=calibrate_method, embed_block_size=embed_block_size
    )
    return group_sensitivity(fp32, builders, held_out)


def int4_group_sweep(fp32: Path, held_out: list[dict], preset) -> list[dict]:
    """The sweep behind ``int4_mixed``: each projection group of ``quantize.linear_groups`` alone in
    ``preset``'s int4 (rtn, its block sizes; everything else fp32, the tied embedding shared int8 in
    every row alike), then every group; top-1 agreement with fp32 on ``held_out`` feeds, and
    ``int8_extra_bytes``: what keeping the group in int8 instead costs (half a byte per weight).
    Rows of ``group_sensitivity``, most sensitive first."""
    from functools import partial

    from distill.export.quantize import group_weight_counts, linear_groups, quantize_weight_only

    groups = {g: nodes for g, nodes in linear_groups(fp32).items() if g != "lm_head"}
    every = [n for nodes in groups.values() for n in nodes]
    blocks = {n: b for g, b in preset.group_block_sizes for n in groups.get(g, [])}
    common = dict(
        bits=4, block_size=preset.block_size, node_block_sizes=blocks, embed_block_size=preset.embed_block_size
    )
    builders: dict[str, Callable[[Path, Path], object]] = {
        g: partial(quantize_weight_only, exclude=[n for n in every if n not in set(nodes)], **common)
        for g, nodes in groups.items()
    }
    builders["all"] = partial(quantize_weight_only, exclude=list(preset.keep_fp32), **common)
    rows = group_sensitivity(fp32, builders, held_out)
    counts = group_weight_counts(fp32, groups)
    for r in rows:
        r["int8_extra_bytes"] = counts.get(r["group"], 0) // 2
    return rows


def pick_int8_groups(rows: list[dict], int4_bytes: int, max_bytes: float) -> list[str]:
    """The groups ``int4_mixed`` keeps in int8: most sensitive first (lowest solo top-1 agreement),
    each taken while the variant stays within ``max_bytes`` (``int4_bytes``: the all-int4 file)."""
    chosen, size = [], int4_bytes
    for r in rows:
        if r["group"] == "all":
            continue
        if size + r["int8_extra_bytes"] <= max_bytes:
            chosen.append(r["group"])
            size += r["int8_extra_bytes"]
    return chosen


def int4_mixed_choice(fp32: Path, held_out: list[dict], preset, max_bytes: float) -> dict:
    """What ``int4_mixed`` keeps in int8 under a ``max_bytes`` file budget: ``int4_group_sweep`` on
    ``held_out``, then ``pick_int8_groups``. Returns the record the report shows: the sweep rows, the
    groups, what keeping them costs in bytes, the budget."""
    rows = int4_group_sweep(fp32, held_out, preset)
    int4_bytes = next(r["bytes"] for r in rows if r["group"] == "all")
    chosen = pick_int8_groups(rows, int4_bytes, max_bytes)
    extra = sum(r["int8_extra_bytes"] for r in rows if r["group"] in chosen)
    return {"sweep": rows, "int8_groups": chosen, "int8_extra_bytes": extra, "max_bytes": int(max_bytes)}


def sensitive_groups(rows: list[dict], threshold: float) -> list[str]:
    """Groups whose solo agreement is below ``threshold`` (candidates to keep in higher precision)."""
    return [r["group"] for r in rows if r["group"] != "all" and r["top1_agreement"] < threshold]


def markdown_table(rows: list[dict], preset: str) -> str:
    """The sensitivity table as markdown (for the export report and model card)."""
    lines = [
        f"Sensitivity of `{preset}` (only this group quantized; top-1 agreement with fp32, teacher-forced):",
        "",
        "| group quantized | size | top-1 agreement |",
        "|---|---|---|",
    ]
    lines += [f"| {r['group']} | {r['bytes'] / 1e6:.0f} MB | {r['top1_agreement']:.1%} |" for r in rows]
    return "\n".join(lines) + "\n"
