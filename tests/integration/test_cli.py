"""The `distill` command as a user types it (a subprocess): help, and one-line errors with exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("run", "generate", "plan", "train", "export", "eval", "ablate", "infer", "serve", "jobs", "recipe", "data")


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


def _one_error_line(res) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stdout + res.stderr
    return lines[0]


def test_help_imports_no_heavy_library():
    code = "import sys; from distill.cli import app; print([m for m in ('torch', 'ray', 'onnxruntime', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    res = _cli("--help")
    assert res.returncode == 0 and res.stderr == ""
    assert "Usage: python -m distill [OPTIONS] COMMAND [ARGS]..." in res.stdout
    listed = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("│ ") and not ln.startswith("│ --")]
    assert listed == list(COMMANDS)


def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\nstudnet:\n  epochs: 1\n")
    line = _one_error_line(_cli("run", str(recipe)))
    assert line == "error: unknown recipe key 'studnet' — did you mean 'student'? (see `distill recipe keys`)"
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_is_clear(tmp_path):
    res = _cli(
        "generate",
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"output_dir={tmp_path}",
        "teacher.model=hf:/no/such/model",
    )
    line = _one_error_line(res)
    assert line == "error: model folder /no/such/model does not exist — fix the model source in the recipe"
    # The failed run left no folder behind.
    assert not (tmp_path / "quickstart").exists()


def test_stage_without_its_input_says_which_command_to_run(tmp_path):
    line = _one_error_line(_cli("train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}"))
    assert line == (
        f"error: stage train needs {tmp_path}/quickstart/generate from this recipe, which is missing or stale"
        " — run `distill generate` (or `distill run`) with the same recipe first"
    )
    assert list(tmp_path.iterdir()) == []


def test_infer_on_missing_bundle(tmp_path):
    line = _one_error_line(_cli("infer", str(tmp_path), "1 + 1 ="))
    assert line == (
        f"error: {tmp_path} is not an export bundle (no distill_generation.json) — pass runs/<name>/export/bundle"
    )


def test_infer_refuses_a_bundle_of_another_major_format(tmp_path, tiny_student):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.export.bundle import FP32_FILE, write_bundle_files
    from distill.export.onnx_export import PADDING_SIDE, export_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    layout = export_decoder(model, tmp_path / FP32_FILE)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    meta = write_bundle_files(tok, model.config, tmp_path, 8, FP32_FILE, padding_side=PADDING_SIDE[layout])
    (tmp_path / "distill_generation.json").write_text(json.dumps({**meta, "format_version": "99.0"}))
    line = _one_error_line(_cli("infer", str(tmp_path), "1 + 1 ="))
    assert line.startswith(f"error: {tmp_path} has bundle format 99.0 but this runtime reads formats ")
    assert line.endswith("or re-export the student with this distill version")


def test_model_needing_its_own_code_is_refused_without_running_it(tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "config.json").write_text(
        '{"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", '
        '"AutoModelForCausalLM": "modeling_evil.EvilModel"}}'
    )
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    line = _one_error_line(
        _cli(
            "generate", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}", f"teacher.model=hf:{model}"
        )
    )
    assert line == (
        f"error: {model} needs its own Python code to load (auto_map in config.json), which distill does not run"
        " by default — set teacher.trust_remote_code=true only if you trust that code"
    )
    assert not marker.exists() and not (tmp_path / "quickstart").exists()


def test_non_utf8_task_file_is_one_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9 1 + 1", "answer": "2"}\n' * 20)
    line = _one_error_line(
        _cli(
            "generate",
            str(ROOT / "recipes" / "quickstart.yaml"),
            f"output_dir={tmp_path}",
            "task.source=file",
            f"task.name={bad}",
            "task.eval_size=2",
        )
    )
    assert line == f"error: task file {bad} is not UTF-8 text — re-encode it as UTF-8"
    assert not (tmp_path / "quickstart").exists()
