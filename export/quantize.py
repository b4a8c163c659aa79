"""Quantization presets for exported decoders (onnxruntime.quantization)."""

from __future__ import annotations

from pathlib import Path


def matmul_nodes(model_path: Path) -> list[str]:
    """Names of MatMul nodes with a constant weight, in graph order."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def quantize_dynamic_int8(src: Path, dst: Path, exclude: list[str] = ()) -> dict:
    """Dynamic int8 (per-channel symmetric weights, dynamic uint8 activations) on MatMuls with
    constant weights, except ``exclude`` (kept fp32). Returns the config used (saved with the model)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = {
        "preset": "int8_dynamic",
        "per_channel": True,
        "weight_type": "QInt8",
        "op_types": ["MatMul"],
        "MatMulConstBOnly": True,
        "nodes_kept_fp32": sorted(exclude),
    }
    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=list(exclude),
        extra_options={"MatMulConstBOnly": True},
    )
    return config
