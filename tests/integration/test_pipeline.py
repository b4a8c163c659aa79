"""`distill run` end to end on tiny real models through a session-scoped local Ray cluster."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_teacher, tiny_student, tiny_task_cfg):
    root = tmp_path_factory.mktemp("run")
    recipe = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": tiny_task_cfg.model_dump(),
        "teacher": {
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 24,
            "batch_size": 4,
            "workers": 2,
            "executor": "ray",
            "dtype": "float32",
        },
        "student": {
            "model": f"hf:{tiny_student}",
            "epochs": 3,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 16,
            "calculator": True,
            "qat": {"steps": 2},
        },
    }
    f = root / "recipe.yaml"
    f.write_text(yaml.safe_dump(recipe))
    return f


@pytest.fixture(scope="module")
def first_run(recipe_file, ray_cluster):
    result = CliRunner().invoke(app, ["run", str(recipe_file)])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(recipe_file.read_text())


def test_generate_writes_parquet_shards_with_schema(first_run):
    import datasets

    gen = f"{first_run['output_dir']}/tiny/generate"
    manifest = json.loads(open(f"{gen}/shards.json").read())
    assert sum(s["rows"] for s in manifest["shards"]) == 12 + 6
    # The shard folder is one Parquet dataset: every row, raw output kept, failures with a reason.
    every = datasets.load_dataset("parquet", data_dir=f"{gen}/shards")["train"]
    assert every.num_rows == 18 and sorted(every["id"]) == sorted(set(every["id"]))
    assert all((r["pred"] is None) == (r["parse_error"] is not None) for r in every)
    ds = datasets.load_dataset(
        "parquet", data_files={"train": f"{gen}/dataset/train.parquet", "eval": f"{gen}/dataset/eval.parquet"}
    )
    assert {"question", "rationale", "pred", "gold", "correct", "parse_error", "prompt"} <= set(
        ds["train"].column_names
    )
    # Correct-only filter: every kept training row is right, and it kept some but not all.
    assert all(ds["train"]["correct"]) and 0 < ds["train"].num_rows <= 12
    assert ds["eval"].num_rows == 6
    metrics = json.loads(open(f"{gen}/metrics.json").read())
    assert metrics["train_rows_kept"] == ds["train"].num_rows
    assert json.loads(open(f"{gen}/distill_config.json").read())["stage"] == "generate"


def test_student_is_loadable_and_changed(first_run, tiny_student):
    import torch
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(f"{first_run['output_dir']}/tiny/train/model")
    base = AutoModelForCausalLM.from_pretrained(tiny_student)
    diff = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters()))
    assert diff > 1e-4 and all(torch.isfinite(p).all() for p in trained.parameters())
    losses = json.loads(open(f"{first_run['output_dir']}/tiny/train/loss.json").read())
    assert losses[-1]["loss"] < losses[0]["loss"]


def test_onnx_greedy_tokens_equal_torch_and_gate_keeps_a_variant(first_run):
    run = f"{first_run['output_dir']}/tiny"
    m = json.loads(open(f"{run}/export/metrics.json").read())
    v = m["fp32_verify"]
    assert v["greedy_identical"] == v["prompts"] > 0 and v["max_abs_logit_error"] < 1e-3
    rows = {r["preset"]: r for r in m["variants"]}
    assert set(rows) == {"fp32", "int8", "int4"}
    assert rows["int8"]["top1_agreement"] > 0.9 and rows["int8"]["bytes"] < rows["fp32"]["bytes"]
    # the default gate: problems of its own (at least 200 where the task has them; the tiny task has fewer
    # left), every variant scored on all of them through onnxruntime unless rejected early
    n = m["gate_split"]["problems"]
    assert m["gate_split"]["split"] == "gate" and m["gate_rule"] == "interval" and 100 < n <= 200
    for r in rows.values():
        assert (r["n"] == n or r.get("rejected_after")) and r["tokens_per_second"] > 0
    # kept: the smallest variant whose paired interval's lower end is within the tolerance, else fp32
    shown = [
        r for p, r in rows.items() if p != "fp32" and not r.get("rejected_after") and r["gap_low"] >= -m["tolerance"]
    ]
    chosen = rows[m["chosen"]]
    assert chosen["chosen"] and chosen["bytes"] == min(r["bytes"] for r in shown or [rows["fp32"]])
    bundle = f"{run}/export/bundle"
    meta = json.loads(open(f"{bundle}/distill_generation.json").read())
    assert meta["model_file"] == chosen["file"]
    genai = json.loads(open(f"{bundle}/genai_config.json").read())
    assert genai["model"]["decoder"]["filename"] == chosen["file"]
    assert "recipe hash" in open(f"{bundle}/README.md").read()
    assert meta["calculator"] is True and "decodes with a calculator" in open(f"{bundle}/README.md").read()
    assert "trained quantization-aware: its last 2 training steps" in open(f"{bundle}/README.md").read()


def test_bundle_runs_with_its_own_runtime_copy(first_run):
    import subprocess
    import sys

    bundle = f"{first_run['output_dir']}/tiny/export/bundle"
    # Run from the bundle folder with an isolated interpreter: nothing from this repository importable.
    code = "import runpy, sys; sys.argv = ['distill_runtime.py', '.', '1 + 2 =', '--max-new-tokens', '4']; runpy.run_path('distill_runtime.py', run_name='__main__')"
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=bundle, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from distill.export.runtime import OnnxGenerator

    # The copy answers exactly as the package's runtime does on the bundle's chosen model (greedy).
    assert res.stdout == OnnxGenerator(bundle).generate(["1 + 2 ="], 4)[0] + "\n"


def test_report_has_numbers_for_every_model(first_run):
    run = f"{first_run['output_dir']}/tiny"
    metrics = json.loads(open(f"{run}/metrics.json").read())
    assert set(metrics["scores"]) == {"teacher", "student_base", "student", "student_onnx"}
    for s in metrics["scores"].values():
        assert s["n"] == 6 and 0 <= s["accuracy"] <= 1 and s["ci95"][0] <= s["accuracy"] <= s["ci95"][1]
    report = open(f"{run}/report.md").read()
    assert "| teacher |" in report and "ONNX" in report and "| int4 |" in report
    assert "Students decode with the calculator" in report
    qat = json.loads(open(f"{run}/train/metrics.json").read())["qat"]
    assert qat["steps"] == 2 and qat["layout"]["block_size"] == 32 and qat["modules"] > 0
    assert "Quantization-aware phase: 2 more steps" in report
    # the teacher calls planned before the first one (`distill run` made the plan), beside those counted
    gen = json.loads(open(f"{run}/generate/metrics.json").read())
    estimate = json.loads(open(f"{run}/estimate.json").read())
    assert estimate["calls"] > 0 and gen["teacher_calls"] >= gen["problems"]
    assert f"| calls | {estimate['calls']:,} | {gen['teacher_calls']:,} |" in report, report
    import os

    assert os.path.getsize(f"{run}/plots/loss.png") > 1000 and os.path.getsize(f"{run}/plots/models.png") > 1000
    teacher_rows = [json.loads(x) for x in open(f"{run}/evaluate/teacher.jsonl")]
    assert sum(r["correct"] for r in teacher_rows) == metrics["scores"]["teacher"]["correct"]


def test_rerun_reuses_stages_and_pays_no_teacher_call(first_run, recipe_file, ray_cluster):
    result = CliRunner().invoke(
        app, ["generate", str(recipe_file), "--force", "teacher.batch_size=3", "teacher.workers=1"]
    )
    assert result.exit_code == 0, result.output
    m = json.loads(open(f"{first_run['output_dir']}/tiny/generate/metrics.json").read())
    assert m["cached_rows"] == m["problems"]  # every row served from the completion cache
    result = CliRunner().invoke(app, ["run", str(recipe_file)])
    assert result.exit_code == 0 and "up to date" in result.output


def test_export_static_int8_sensitivity_and_ort_format(first_run, recipe_file, tmp_path):
    """The export stage alone with the extra presets, over a copy of the first run's student."""
    import shutil

    src = f"{first_run['output_dir']}/tiny"
    dst = f"{first_run['output_dir']}/tiny_quant"
    for stage in ("generate", "train"):
        shutil.copytree(f"{src}/{stage}", f"{dst}/{stage}", dirs_exist_ok=True)
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(recipe_file),
            "name=tiny_quant",
            "export.variants=[int8,int8_static,int4,fp16]",
            "export.block_size=16",  # not the blocks the student's quantization-aware phase trained for
            "export.sensitivity=true",
            "export.ort_format=true",
            "export.calibration_examples=4",
            "export.gate_size=0",  # the variants, not the gate: scored on the 6 eval problems, every one
        ],
    )
    assert result.exit_code == 0, result.output
    m = json.loads(open(f"{dst}/export/metrics.json").read())
    rows = {r["preset"]: r for r in m["variants"]}
    assert set(rows) == {"fp32", "int8", "int8_static", "int4", "fp16"} and not any(r["error"] for r in rows.values())
    assert "trained quantization-aware for int4 blocks (32," in " ".join(result.output.split())
    assert rows["int8_static"]["top1_agreement"] > 0.8 and rows["int8_static"]["bytes"] < rows["fp32"]["bytes"]
    for r in rows.values():  # the paired lost/gained problems explain each accuracy gap exactly
        assert r["correct"] - rows["fp32"]["correct"] == r["gained"] - r["lost"]
    assert rows["fp32"]["lost"] == rows["fp32"]["gained"] == 0
    assert "vs fp32 (problems)" in open(f"{dst}/export/bundle/README.md").read()
    groups = [r["group"] for r in m["sensitivity"]]
    assert set(groups) == {"q", "k", "v", "o", "gate", "up", "down", "embedding+lm_head", "all"}
    assert groups[-1] == "all" and all(0 <= r["top1_agreement"] <= 1 for r in m["sensitivity"])
    bundle = f"{dst}/export/bundle"
    meta = json.loads(open(f"{bundle}/distill_generation.json").read())
    assert meta["ort_model_file"].endswith(".ort") and meta["format_version"]
    qcfg = json.loads(open(f"{dst}/export/variants/quantization_configs.json").read())
    assert qcfg["int8_static"]["calibration_examples"] == 4
    from distill.export.runtime import OnnxGenerator

    ort_out = OnnxGenerator(bundle, meta["ort_model_file"]).generate(["1 + 2 ="], 6)
    assert ort_out == OnnxGenerator(bundle).generate(["1 + 2 ="], 6)
    card = open(f"{bundle}/README.md").read()
    assert "| int8_static |" in card and "Sensitivity of `int8_static`" in card


def test_export_int4_mixed_from_the_sweep_and_calibrated_gptq(first_run, recipe_file):
    """The export stage with int4_mixed (groups picked by the int4 sweep on the distilled data, within
    the size budget) and GPTQ int4 calibrated on the training rows: both are gated like any variant."""
    from distill.config import load_recipe
    from distill.stages.export import export_stage

    src = f"{first_run['output_dir']}/tiny"
    recipe = load_recipe(
        recipe_file,
        [
            "student.qat=null",  # the phase trains for rtn's grid; gptq fits its own
            "export.variants=[int4,int4_mixed]",
            "export.int4_algorithm=gptq",
            "export.block_size=16",
            "export.group_block_sizes={}",
            "export.int4_mixed_max_size=0.5",
            "export.calibration_examples=4",
            "export.gate_size=0",
        ],
    )
    out = recipe_file.parent / "mixed_export"
    result = export_stage(recipe, Path(f"{src}/train"), Path(f"{src}/generate"), out)
    m = result.metrics
    rows = {r["preset"]: r for r in m["variants"]}
    assert set(rows) == {"fp32", "int4", "int4_mixed"} and not any(r["error"] for r in rows.values())
    mixed = m["int4_mixed"]
    assert [r["group"] for r in mixed["sweep"]][-1] == "all" and mixed["int8_groups"]
    assert rows["int4"]["bytes"] < rows["int4_mixed"]["bytes"] <= mixed["max_bytes"] + 1024
    qcfg = json.loads((out / "variants" / "quantization_configs.json").read_text())
    assert qcfg["int4"]["algorithm"] == "gptq" and qcfg["int4"]["calibration_feeds"] == 4
    assert qcfg["int4_mixed"]["int8_groups"] == mixed["int8_groups"]
    assert all(r["decision"] for r in m["variants"] if r["preset"] != "fp32")
