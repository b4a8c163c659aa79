import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_help_imports_no_heavy_library():
    code = "import sys; from distill.cli import app; print([m for m in ('torch', 'ray', 'onnxruntime', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert _cli("--help").returncode == 0


def test_bad_recipe_is_one_line_exit_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\nstudnet:\n  epochs: 1\n")
    res = _cli("run", str(recipe))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "studnet" in lines[0] and "student" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_is_clear(tmp_path):
    res = _cli(
        "generate",
        str(ROOT / "recipes" / "quickstart.yaml"),
        f"output_dir={tmp_path}",
        "teacher.model=hf:/no/such/model",
    )
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "/no/such/model" in res.stderr
    # The failed stage left no half-written folder behind.
    assert not (tmp_path / "quickstart" / "generate").exists()
    assert [p.name for p in (tmp_path / "quickstart").iterdir()] == ["recipe.yaml"]


def test_stage_without_its_input_says_which_command_to_run(tmp_path):
    res = _cli("train", str(ROOT / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}")
    assert res.returncode == 2 and "distill generate" in res.stderr


def test_infer_on_missing_bundle(tmp_path):
    res = _cli("infer", str(tmp_path), "1 + 1 =")
    assert res.returncode == 2 and "not an export bundle" in res.stderr


def test_pickle_only_student_is_refused(tmp_path, tiny_student):
    import shutil

    import torch
    from safetensors.torch import load_file

    from distill.errors import DistillError
    from distill.stages.train import load_student

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_student, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    try:
        load_student(f"hf:{folder}")
    except DistillError as e:
        assert "safetensors" in str(e)
    else:
        raise AssertionError("a pickle checkpoint was loaded")
