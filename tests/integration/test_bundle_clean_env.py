"""The exported bundle in a fresh virtualenv holding only onnxruntime + tokenizers (`make test-slow`)."""

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bundle_runs_without_torch(tmp_path, tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill.export.runtime
    from distill.export.bundle import FP32_FILE, write_bundle_files
    from distill.export.onnx_export import PADDING_SIDE, export_decoder

    bundle = tmp_path / "bundle"
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    layout = export_decoder(model, bundle / FP32_FILE)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    write_bundle_files(tok, model.config, bundle, 8, FP32_FILE, padding_side=PADDING_SIDE[layout])

    shutil.copy2(distill.export.runtime.__file__, bundle / "distill_runtime.py")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "onnxruntime==1.32.*", "tokenizers>=0.22"], check=True)
    code = (
        "import runpy, sys\n"
        "sys.argv = ['distill_runtime.py', '.', '1 + 2 =', '--max-new-tokens', '4']\n"
        "try:\n    runpy.run_path('distill_runtime.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([venv / "bin" / "python", "-c", code], cwd=bundle, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"
    assert subprocess.run([venv / "bin" / "python", "-c", "import torch"], capture_output=True).returncode != 0
