"""vLLM engine: a clear error where it cannot run; the real thing where vllm and CUDA are present."""

import pytest

from distill.config import TeacherConfig
from distill.core.errors import DistillError
from distill.teachers.backends.base import Decoding, GenerationRequest
from distill.teachers.workers import make_backend


def _have_vllm_gpu() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_have_vllm_gpu(), reason="vllm and CUDA are present: the GPU test below runs instead")
def test_vllm_engine_without_vllm_is_one_clear_error(tiny_teacher):
    with pytest.raises(DistillError, match="vllm"):
        make_backend(TeacherConfig(model=f"hf:{tiny_teacher}", engine="vllm"), str(tiny_teacher))


@pytest.mark.gpu
@pytest.mark.skipif(not _have_vllm_gpu(), reason="needs vllm and a CUDA GPU")
def test_vllm_engine_matches_transformers_greedy(tiny_teacher):
    from distill.teachers.backends.transformers import TransformersBackend

    reqs = [GenerationRequest(f"{a} + {b} =", Decoding(max_new_tokens=12)) for a, b in [(1, 2), (3, 4), (5, 1)]]
    vllm_out = make_backend(TeacherConfig(model=f"hf:{tiny_teacher}", engine="vllm", dtype="float32"), tiny_teacher)
    ref = TransformersBackend(tiny_teacher, dtype="float32").generate(reqs)
    got = vllm_out.generate(reqs)
    assert vllm_out.model_id == TransformersBackend(tiny_teacher, dtype="float32").model_id
    assert [c.text for c in got] == [c.text for c in ref]
