"""Quantization-aware training: the simulated grids are the export's, checked against real exported files."""

import numpy as np
import pytest
import torch
from tiny import export_bundle
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.export.bundle import FP32_FILE
from distill.export.quantize import QuantPreset, make_variant, quantize_weight_only
from distill.export.runtime import make_session
from distill.export.verify import verify
from distill.students.qat import QuantLayout, fake_quantize_blocks, fake_quantized, quantized_modules


def _matmul_model(path, w: np.ndarray) -> None:
    """One ``y = x @ W`` with ``W`` [K, N] a constant, saved to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("bits,k", [(4, 128), (8, 128), (4, 80)])
def test_weight_grid_is_onnxruntimes(tmp_path, bits, k):
    """``fake_quantize_blocks`` of a torch weight [out, in] equals the weight onnxruntime's MatMulNBits
    computes with, read back by multiplying the identity (one-hot rows quantize exactly); K = 80 is
    not a multiple of the block (the quantizer pads the last block with zeros)."""
    rng = np.random.default_rng(0)
    n = 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[5, 3], w[70, 3], w[40, 9] = 9.0, -11.0, 0.0  # outliers of both signs decide their blocks' scales
    w[32:64, 7] = 0.0  # an all-zero block
    _matmul_model(tmp_path / "mm.onnx", w)
    quantize_weight_only(tmp_path / "mm.onnx", tmp_path / "q.onnx", bits=bits, block_size=32, accuracy_level=4)
    got = make_session(tmp_path / "q.onnx").run(["y"], {"x": np.eye(k, dtype=np.float32)})[0]
    want = fake_quantize_blocks(torch.from_numpy(w.T.copy()), bits, 32).T.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(w).max()
    assert np.abs(want - w).max() > 0  # the grid really rounds


def test_gradient_passes_straight_through():
    w = torch.tensor([[0.3, -1.0, 0.52, 0.0, 0.9, -0.26, 0.1, 0.77]], requires_grad=True)
    q = fake_quantize_blocks(w, 4, 8)
    (q * torch.arange(8.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(8.0)[None])  # no value here is clamped: identity
    assert set(q.detach()[0].tolist()) <= {v * 1.0 / 8 for v in range(-8, 8)}  # m = -1: scale 1/8


@pytest.fixture(scope="module")
def exported(tiny_student, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student).eval()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    out = tmp_path_factory.mktemp("qat_bundle")
    export_bundle(model, tok, out)
    return model, tok, out


def test_fake_quantized_student_computes_what_the_int4_export_computes(exported):
    """The tiny student under ``fake_quantized`` with the int4 preset's layout gives the logits of the
    int4 file ``make_variant`` writes for it, far closer than the plain student does."""
    model, tok, out = exported
    preset = QuantPreset.int4(block_size=16, group_block_sizes={"gate": 32, "up": 32, "down": 32}, embed_block_size=32)
    make_variant(preset, out / FP32_FILE, out / "model.int4.onnx")
    questions = ["State the final answer to the following arithmetic problem: 3 + 4 =", "12 - 7 ="]
    plain = verify(model, tok, out, "model.int4.onnx", questions, 6)
    layout = QuantLayout(4, 16, (("gate", 32), ("up", 32), ("down", 32)), 8, 32)
    with fake_quantized(model, layout) as plan:
        simulated = verify(model, tok, out, "model.int4.onnx", questions, 6)
    n_layers = model.config.num_hidden_layers
    assert len(plan) == 7 * n_layers + 2  # every projection, the embedding and its tied LM head
    assert plan["model.layers.0.mlp.down_proj"] == (4, 32) and plan["model.embed_tokens"] == (8, 32)
    assert simulated["top1_agreement"] == 1.0 and simulated["greedy_identical"] == len(questions)
    assert simulated["max_abs_logit_error"] < 0.1 * plain["max_abs_logit_error"]
    # leaving the block restores the plain forward (no instance attribute left behind)
    assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)
    assert verify(model, tok, out, "model.int4.onnx", questions, 6)["max_abs_logit_error"] == pytest.approx(
        plain["max_abs_logit_error"]
    )


def test_an_unknown_layout_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    net.get_input_embeddings = lambda: None
    net.get_output_embeddings = lambda: None
    assert quantized_modules(net, QuantLayout()) == {}
    with pytest.raises(ValueError, match="no q/k/v/o/gate/up/down projections"):
        with fake_quantized(net, QuantLayout()):
            pass
