"""int4 algorithms on a trained student (issue #16): round to nearest, HQQ, k-quant, GPTQ and
int4_mixed — size, next-token agreement with the fp32 ONNX model and mean logit error, teacher-forced
over held-out examples of the distilled data.

    python bench/int4_algorithms.py runs/<name>/train/model runs/<name>/generate/dataset/eval.parquet

Every variant is built from the same fp32 export by ``make_variant``, exactly as the export stage
builds it, and scored on the same sequences in the same run (ratios against fp32 only). GPTQ is
calibrated, and int4_mixed's groups are swept, on training rows (``--train``, default the
``train.parquet`` beside the rows file: 32 calibration and 16 sweep examples, as the export stage
takes them), never on the scored rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()


def main() -> int:
    import numpy as np
    import onnxruntime as ort
    import pyarrow.parquet as pq

    from distill.core.answers import Task
    from distill.export.bundle import model_bytes
    from distill.export.calibration import feeds_for
    from distill.export.onnx_export import export_decoder, kv_shape
    from distill.export.quantize import QuantPreset, make_variant
    from distill.export.sensitivity import int4_mixed_choice
    from distill.students.data import build_examples
    from distill.students.models import load_student

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a trained student folder (runs/<name>/train/model)")
    ap.add_argument("rows", type=Path, help="a dataset Parquet file with question/rationale/gold (held-out rows)")
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--train", type=Path, help="training rows for calibration (default: train.parquet beside rows)")
    ap.add_argument("--max-size", type=float, default=0.2, help="int4_mixed: the largest file, as a share of fp32")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    model, tokenizer = load_student(str(args.model))
    model = model.eval()
    rows = [r for r in pq.read_table(args.rows).to_pylist() if r.get("rationale")][: args.examples]
    examples = build_examples(tokenizer, rows, "rationale", Task("number"), args.max_length)
    _, kv_heads, head_dim = kv_shape(model.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_decoder(model, tmp / "model.onnx")
        files = {"fp32": "model.onnx"}
        seconds = {}
        train = args.train or args.rows.with_name("train.parquet")
        train_rows = [r for r in pq.read_table(train).to_pylist() if r.get("rationale")][:48]
        train_ids = [
            e["input_ids"] for e in build_examples(tokenizer, train_rows, "rationale", Task("number"), args.max_length)
        ]
        calib = feeds_for(tmp / "model.onnx", train_ids[:32], kv_heads, head_dim)
        sweep_feeds = feeds_for(tmp / "model.onnx", train_ids[32:], kv_heads, head_dim)
        t0 = time.time()
        choice = int4_mixed_choice(
            tmp / "model.onnx", sweep_feeds, QuantPreset.int4(), args.max_size * model_bytes(tmp, "model.onnx")
        )
        sweep, chosen = choice["sweep"], choice["int8_groups"]
        sweep_s = time.time() - t0
        presets = {
            "int4 rtn": QuantPreset.int4(),
            "int4 hqq": QuantPreset.int4(algorithm="hqq"),
            "int4 kquant": QuantPreset.int4(algorithm="kquant"),
            "int4 gptq": QuantPreset.int4(algorithm="gptq"),
            f"int4_mixed ({'+'.join(chosen) or 'none'} int8)": QuantPreset.int4_mixed(chosen),
        }
        for name, preset in presets.items():
            file = f"model.{len(files)}.onnx"
            t0 = time.time()
            make_variant(preset, tmp / "model.onnx", tmp / file, calib)
            seconds[name], files[name] = time.time() - t0, file
        seconds[next(reversed(presets))] += sweep_s
        print("int4 sweep (each group alone in int4, top-1 agreement on the sweep rows):")
        for r in sweep:
            print(f"  {r['group']}: {r['top1_agreement']:.1%}, int8 costs +{r['int8_extra_bytes'] / 1e6:.1f} MB")
        feeds = feeds_for(tmp / "model.onnx", [e["input_ids"] for e in examples], kv_heads, head_dim)
        targets = [np.array(e["labels"][1:]) != -100 for e in examples]  # positions predicting a target token

        def logits(file: str) -> list:
            session = ort.InferenceSession(str(tmp / file), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            return [session.run(None, {k: v for k, v in f.items() if k in names})[0][0, :-1] for f in feeds]

        ref = logits(files["fp32"])
        fp32_bytes = model_bytes(tmp, files["fp32"])
        print(
            "| variant | size / fp32 | top-1 agreement with fp32 (target positions) | mean abs logit error | quantize s |"
        )
        print("|---|---|---|---|---|")
        for name, file in files.items():
            out = logits(file)
            agree = np.concatenate([(o.argmax(-1) == r.argmax(-1))[m] for o, r, m in zip(out, ref, targets)])
            err = np.concatenate([np.abs(o - r)[m].mean(-1) for o, r, m in zip(out, ref, targets)])
            ratio = model_bytes(tmp, file) / fp32_bytes
            print(
                f"| {name} | {ratio:.3f} | {agree.mean():.1%} ({agree.size} tokens) | {err.mean():.3f} | {seconds.get(name, 0):.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
