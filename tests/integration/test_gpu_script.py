"""bench/gpu.py's dry run: every GPU measurement's code path on CPU at tiny sizes, its table marked."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _gpu_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_dry_run_measures_every_part(tmp_path, capsys):
    gpu = _gpu_script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gpu.main(["--dry-run", "--json", str(tmp_path / "gpu.json")]) == 0
    out = capsys.readouterr().out
    assert "dry run on CPU" in out.splitlines()[0]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["dry_run"] is True
    rows = {(r["part"], r["engine"], r["batch"]): r for r in report["rows"]}
    for batch in (2, 4):
        for engine in ("HF generate", "distill TransformersBackend loop", "HF generate, static cache + torch.compile"):
            assert rows[("teacher", engine, batch)]["tokens_per_s"] > 0, rows[("teacher", engine, batch)]
        vllm = rows[("teacher", "vLLM", batch)]  # not installed here, or needs CUDA: the row says which
        assert vllm["tokens_per_s"] is None and vllm["note"] in ("vllm not installed", "needs CUDA (dry run)")
    (trainer,) = [r for r in report["rows"] if r["part"] == "trainer"]
    assert trainer["tokens_per_s"] > 0 and 0 < trainer["mfu"] < 1 and "4x32" in trainer["note"]
    assert rows[("onnx", "onnxruntime CPUExecutionProvider", 2)]["tokens_per_s"] > 0
    assert out.count("\n| ") == len(report["rows"]) + 1  # one table line per row, and the header


@pytest.mark.skipif("torch" in sys.modules and sys.modules["torch"].cuda.is_available(), reason="has a GPU")
def test_gpu_script_refuses_without_cuda(capsys):
    assert _gpu_script().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
