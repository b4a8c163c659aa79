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
    # The failed run left no folder behind.
    assert not (tmp_path / "quickstart").exists()


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

    from distill.core.errors import DistillError
    from distill.students.models import load_student

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


def _one_error_line(res) -> str:
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stdout + res.stderr
    return lines[0]


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
    assert "teacher.trust_remote_code=true" in line
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
    assert "not UTF-8" in line and str(bad) in line
