"""The batch-1 speed ceiling of each quantization preset: a student's weight matrices alone, one row in.

    .venv/bin/python bench/gemv_ceiling.py [runs/quickstart/train/model] [--rounds 20]

A decoded token at batch 1 multiplies one activation row by every weight matrix of the model (7 per
layer plus the LM head). This builds exactly that set of matrices from the student's config (random
values: the kernels' speed does not depend on them) and runs it, 1 thread each, interleaved rounds,
best round kept, in torch fp32 (``F.linear``, the baseline of ``bench/export_speed.py``) and in
onnxruntime as fp32 ``MatMul``, as the ``int8`` / ``int4`` presets' ``MatMulNBits`` (quantized by
``export.quantize`` with the default block layout; here the int4 LM head is 4-bit too, where the
exported int4 model shares an int8 embedding) and as ``int8_dynamic``'s ``DynamicQuantizeMatMul``
(per-channel weights, one activation scale per tensor: a faster kernel, but see BENCHMARKS.md for
what that scale costs in accuracy). Attention, norms, the prompt pass and the Python loop are left
out, so the ratio printed for a preset is the most any decoder graph built on these kernels can reach
against torch fp32 on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()  # offline, no telemetry, one thread (before torch or onnxruntime load)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Node name -> (in, out) features of every weight matrix a decoded token multiplies."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    per_layer = {"q": (h, heads * d), "k": (h, kv * d), "v": (h, kv * d), "o": (heads * d, h)}
    per_layer |= {"gate": (h, i), "up": (h, i), "down": (i, h)}
    out = {f"{g}.{n}": s for n in range(config["num_hidden_layers"]) for g, s in per_layer.items()}
    out["lm_head"] = (h, config["vocab_size"])
    return out


def build_onnx(mats: dict[str, tuple[int, int]], path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    widths = sorted({k for k, _ in mats.values()})
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths]
    nodes, inits, outputs = [], [], []
    for name, (k, n) in mats.items():
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), f"w.{name}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w.{name}"], [f"y.{name}"], name=name))
        outputs.append(helper.make_tensor_value_info(f"y.{name}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "gemv", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?", default=ROOT / "runs" / "quickstart" / "train" / "model")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from distill.config import ExportConfig
    from distill.export.quantize import quantize_dynamic_int8, quantize_weight_only

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    config = json.loads((args.model / "config.json").read_text())
    mats = shapes(config)
    cfg = ExportConfig()
    node_blocks = {n: cfg.group_block_sizes[n.split(".")[0]] for n in mats if n.split(".")[0] in cfg.group_block_sizes}
    node_blocks["lm_head"] = cfg.embed_block_size or cfg.block_size  # the shared embedding / LM head block

    with tempfile.TemporaryDirectory(prefix="gemv_") as d:  # ~1.4 GB of ONNX files, gone once loaded
        tmp = Path(d)
        build_onnx(mats, tmp / "fp32.onnx")
        for bits in (8, 4):
            quantize_weight_only(
                tmp / "fp32.onnx", tmp / f"int{bits}.onnx", bits, cfg.block_size, node_block_sizes=node_blocks
            )
        quantize_dynamic_int8(tmp / "fp32.onnx", tmp / "int8_dynamic.onnx")
        variants = ("fp32", "int8", "int4", "int8_dynamic")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sessions = {
            f"onnx {v}": ort.InferenceSession(str(tmp / f"{v}.onnx"), opts, providers=["CPUExecutionProvider"])
            for v in variants
        }
        sizes = {f"onnx {v}": (tmp / f"{v}.onnx").stat().st_size for v in variants}
    rng = np.random.default_rng(1)
    feeds = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in sorted({k for k, _ in mats.values()})}
    weights = [torch.randn(n, k) * 0.02 for k, n in mats.values()]
    ins = [torch.from_numpy(feeds[f"x{k}"]) for k, _ in mats.values()]
    sizes["torch fp32"] = sum(w.numel() * 4 for w in weights)

    def torch_pass():
        with torch.inference_mode():
            for x, w in zip(ins, weights):
                torch.nn.functional.linear(x, w)

    runners = {"torch fp32": torch_pass, **{k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}}
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / 3)

    base = best["torch fp32"]
    print(f"{len(mats)} weight matrices of {args.model} ({sizes['torch fp32'] / 1e6:.0f} MB fp32), batch 1, 1 thread")
    print(f"{'kernel':<18}{'ms/token':>10}{'weights':>10}{'GB/s':>7}{'vs torch':>10}{'byte ratio':>12}")
    for name, t in best.items():
        print(
            f"{name:<18}{t * 1e3:>10.2f}{sizes[name] / 1e6:>8.1f}MB{sizes[name] / t / 1e9:>7.1f}"
            f"{base / t:>10.2f}{sizes['torch fp32'] / sizes[name]:>12.2f}"
        )


if __name__ == "__main__":
    main()
