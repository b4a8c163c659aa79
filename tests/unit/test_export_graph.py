"""Projection groups of an exported graph are read from the names the export gives each constant-weight
MatMul (its torch module), never from the MatMuls' places in the graph."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.export.onnx_export import export_decoder
from distill.export.quantize import (
    LINEAR_GROUPS,
    QuantPreset,
    linear_groups,
    make_variant,
    matmul_nodes,
    matmul_weights,
)

ATTENTION = {"q", "k", "v", "o"}


def _module(group: str, layer: int) -> str:
    return f"model.layers.{layer}.{'self_attn' if group in ATTENTION else 'mlp'}.{group}_proj"


def _weights(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.fixture(scope="module", params=[("llama", "fused"), ("llama", "generic"), ("qwen2", "fused")])
def exported(request, tmp_path_factory):
    from tiny import build_model

    arch, attention = request.param
    folder = build_model(tmp_path_factory.mktemp(arch), arch, seed=4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_decoder(model, path, attention=attention) == attention
    return model, path


def _assert_groups_are_the_modules(model, path, groups):
    """Each group's node is named after its module and multiplies exactly that module's weight."""
    n_layers = model.config.num_hidden_layers
    assert list(groups) == list(LINEAR_GROUPS)
    weights, by_node = _weights(path), matmul_weights(path)
    modules = dict(model.named_modules())
    for g in LINEAR_GROUPS:
        assert groups[g] == [f"{_module(g, i)}/MatMul" for i in range(n_layers)]
        for i, node in enumerate(groups[g]):
            assert by_node[node] == f"{_module(g, i)}.weight"
            torch_weight = modules[_module(g, i)].weight.detach().numpy()  # [out, in]; MatMul reads [in, out]
            np.testing.assert_array_equal(weights[by_node[node]], torch_weight.T)


def test_groups_map_to_the_modules_they_compute(exported):
    model, path = exported
    groups = linear_groups(path, model.config.num_hidden_layers)
    _assert_groups_are_the_modules(model, path, groups)
    # shapes of the tiny config: hidden 64, 4 heads / 2 kv heads of 16, MLP 128
    shapes = {g: _weights(path)[matmul_weights(path)[groups[g][0]]].shape for g in LINEAR_GROUPS}
    assert shapes == {
        "q": (64, 64),
        "k": (64, 32),
        "v": (64, 32),
        "o": (64, 64),
        "gate": (64, 128),
        "up": (64, 128),
        "down": (128, 64),
    }
    assert linear_groups(path) == groups  # the layer count follows from the names too


def test_groups_follow_names_when_the_node_order_differs(exported, tmp_path):
    """Swap q with v and gate with up in every layer (siblings reading the same input, so the graph
    stays valid and computes the same logits): a position-based reading would call the v projections
    ``q``; the names keep every group right."""
    import onnx
    import onnxruntime as ort

    model, path = exported
    m = onnx.load(str(path))
    nodes = list(m.graph.node)
    index = {n.name: i for i, n in enumerate(nodes)}
    for layer in range(model.config.num_hidden_layers):
        for a, b in (("q", "v"), ("gate", "up")):
            i, j = index[f"{_module(a, layer)}/MatMul"], index[f"{_module(b, layer)}/MatMul"]
            nodes[i], nodes[j] = nodes[j], nodes[i]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    shuffled = tmp_path / "shuffled.onnx"
    onnx.save(m, str(shuffled))

    first = matmul_nodes(shuffled)[0]
    assert first == f"{_module('v', 0)}/MatMul"  # position 0 of the first layer is no longer q
    groups = linear_groups(shuffled, model.config.num_hidden_layers)
    _assert_groups_are_the_modules(model, shuffled, groups)
    # the reordered graph computes the same logits: only the order changed
    ids = np.array([[3, 5, 7]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    for i in m.graph.input:
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
    a, b = (ort.InferenceSession(str(p)).run(["logits"], feed)[0] for p in (path, shuffled))
    np.testing.assert_array_equal(a, b)
    # and a preset keeping a group keeps the named projections: int8_dynamic leaves the downs fp32
    config = make_variant(QuantPreset.int8_dynamic(), shuffled, tmp_path / "d.onnx")
    assert config["nodes_kept_fp32"] == sorted(groups["down"])
    q = onnx.load(str(tmp_path / "d.onnx"))
    inits = {i.name: tuple(i.dims) for i in q.graph.initializer}
    kept = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert sorted(n.name for n in kept) == sorted(groups["down"]) and {inits[n.input[1]] for n in kept} == {(128, 64)}


def test_unknown_layouts_give_no_groups(exported, tmp_path):
    import onnx

    model, path = exported
    n_layers = model.config.num_hidden_layers
    assert linear_groups(path, n_layers + 1) == {}  # names of 2 layers, 3 expected

    def variant(rename) -> dict:
        m = onnx.load(str(path))
        targets = {w: rename(w) for w in matmul_weights(path).values()}
        for init in m.graph.initializer:
            init.name = targets.get(init.name, init.name)
        for n in m.graph.node:
            n.input[:] = [targets.get(x, x) for x in n.input]
        onnx.save(m, str(tmp_path / "renamed.onnx"))
        return linear_groups(tmp_path / "renamed.onnx", n_layers)

    # anonymous weights, as the exporter itself names them (val_63): unknown, not guessed by position
    assert variant(lambda w: f"val_{abs(hash(w)) % 10_000}") == {}
    # one projection missing from one layer (a fused qkv elsewhere, say)
    assert variant(lambda w: w.replace("layers.1.self_attn.k_proj", "layers.1.self_attn.qkv")) == {}
    # two weights claiming the same projection
    assert variant(lambda w: w.replace("layers.1.self_attn.k_proj", "layers.1.self_attn.q_proj")) == {}
    assert variant(lambda w: w) == linear_groups(path, n_layers)  # unchanged names: the groups


def test_an_untied_lm_head_is_its_own_group(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    export_decoder(model, tmp_path / "model.onnx")
    groups = linear_groups(tmp_path / "model.onnx", 2)
    assert groups["lm_head"] == ["lm_head/MatMul"] and len(groups) == 8
    weights = _weights(tmp_path / "model.onnx")
    np.testing.assert_array_equal(weights["lm_head.weight"], model.lm_head.weight.detach().numpy().T)
