"""Quantization presets for exported decoders (onnxruntime.quantization).

- ``int8`` (default): weight-only blockwise int8 (``MatMulNBits`` bits=8, block 32) computed with
  int8 kernels (accuracy level 4: activations quantized per block of each row at run time). Per-row
  activation scales survive the outlier channels and the attention-sink token that wreck per-tensor
  dynamic quantization; measured on SmolLM2-135M: 98% top-1 agreement with fp32 vs 67%.
- ``int8_dynamic``: classic ``quantize_dynamic`` (per-channel int8 weights, one uint8 scale per
  activation tensor), with the sensitive MatMuls kept fp32.
- ``int4``: weight-only ``MatMulNBits`` bits=4.
- ``fp16``: every float tensor in half precision (inputs/outputs stay fp32), for GPU/NPU targets.

A preset is a ``QuantPreset`` built by its named constructor (``QuantPreset.int8(block_size=32)``);
``make_variant`` writes the variant and, beside it, the config that produced it
(``model.int8.onnx`` → ``model.int8.quant.json``, readable back with ``QuantPreset.from_dict``).
Projection groups (``q k v o gate up down``) are found by the weights' names, never by position.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from distill.core.artifacts import write_json


def matmul_weights(model_path: Path) -> dict[str, str]:
    """Weight initializer name of every MatMul node with a constant weight, by node name, in graph order."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return {n.name: n.input[1] for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def matmul_nodes(model_path: Path) -> list[str]:
    """Names of MatMul nodes with a constant weight, in graph order."""
    return list(matmul_weights(model_path))


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


LINEAR_GROUPS = ("q", "k", "v", "o", "gate", "up", "down")
# Weight names ``onnx_export.name_linear_weights`` gives: ``model.layers.3.self_attn.q_proj.weight``,
# ``model.layers.3.mlp.down_proj.weight``, ``lm_head.weight`` (an untied LM head).
_PROJECTION_WEIGHT = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+\.(q|k|v|o|gate|up|down)_proj\.weight$")
_LM_HEAD_WEIGHT = re.compile(r"(?:^|\.)lm_head\.weight$")


def linear_groups(model_path: Path, n_layers: int | None = None) -> dict[str, list[str]]:
    """Constant-weight MatMul node names by projection (``q k v o gate up down``, layer 0 first, plus
    ``lm_head`` when it is an untied MatMul), told apart by their weight initializer's name
    (``model.layers.3.mlp.down_proj.weight``), never by their place in the graph. Empty when the names
    do not show each of the seven projections exactly once in every layer (``n_layers`` of them, when
    given): an unknown layout."""
    found: dict[str, dict[int, str]] = {g: {} for g in LINEAR_GROUPS}
    heads = []
    for node, weight in matmul_weights(model_path).items():
        if m := _PROJECTION_WEIGHT.search(weight):
            layer, group = int(m.group(1)), m.group(2)
            if layer in found[group]:
                return {}  # two weights claim one projection: not a layout we know
            found[group][layer] = node
        elif _LM_HEAD_WEIGHT.search(weight):
            heads.append(node)
    layers = set(range(n_layers if n_layers is not None else len(found["q"])))
    if not layers or any(set(by_layer) != layers for by_layer in found.values()):
        return {}
    groups = {g: [found[g][i] for i in sorted(layers)] for g in LINEAR_GROUPS}
    if len(heads) == 1:
        groups["lm_head"] = heads
    return groups


def group_weight_counts(model_path: Path, groups: Mapping[str, list[str]]) -> dict[str, int]:
    """Number of weights in each group's MatMuls (read from the initializers' shapes, no data loaded)."""
    import math

    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: math.prod(i.dims) for i in m.graph.initializer}
    weight = matmul_weights(model_path)
    return {g: sum(dims[weight[n]] for n in nodes) for g, nodes in groups.items()}


def tied_head_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes whose weight is ``Transpose(initializer)`` (a tied LM head)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    transposed = {n.output[0] for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in transposed]


def quantize_weight_only(
    src: Path,
    dst: Path,
    bits: int = 8,
    block_size: int = 32,
    accuracy_level: int = 4,
    exclude: list[str] = (),
    node_block_sizes: dict[str, int] | None = None,
    embed_block_size: int | None = None,
    algorithm: str = "rtn",
    feeds: list[dict] | None = None,
    node_bits: dict[str, int] | None = None,
    symmetric: bool = True,
) -> dict:
    """Blockwise weight-only quantization of constant-weight MatMuls to ``MatMulNBits``.

    ``algorithm``: ``rtn`` rounds each block to the nearest step of its grid; ``hqq`` (half-quadratic
    quantization, onnxruntime's ``HQQWeightOnlyQuantConfig``) fits each block's scale and zero point to
    minimise the weight error, with no calibration data (asymmetric); ``kquant`` (llama.cpp's k-quant
    search, ``KQuantWeightOnlyQuantConfig``) searches each block's scale and zero point (asymmetric);
    ``gptq`` (``GPTQWeightOnlyQuantConfig``) quantizes each matrix column by column, pushing the
    rounding error onto the columns not yet rounded through the inverse Hessian of the layer's inputs
    on ``feeds`` (calibration prompts and targets of the distilled data).

    ``accuracy_level`` 4 computes with int8 (activations quantized per block at run time); 0/1
    dequantize to fp32. ``node_block_sizes`` gives some nodes their own block size, ``node_bits``
    their own width (int4_mixed: the sensitive ones in 8 bits; rtn only); ``embed_block_size`` that of
    the tied embedding / LM head (default ``block_size``). ``symmetric``: an rtn grid without zero
    points (the other algorithms always fit them). Returns the config used (saved next to the model).
    """
    import onnx

    if algorithm not in WEIGHT_ONLY_ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: one of {', '.join(WEIGHT_ONLY_ALGORITHMS)}")
    if algorithm == "gptq" and not feeds:
        raise ValueError("int4 gptq needs calibration feeds (prompts and targets of the distilled data)")
    model = onnx.load(str(src))
    per_node = dict(node_block_sizes or {})
    widths = dict(node_bits or {})
    if widths and algorithm != "rtn":
        raise ValueError(f"per-node bit widths (int4_mixed) are built with rtn, not {algorithm}")
    nodes = [n for n in matmul_nodes(src) if n not in set(exclude)]
    if algorithm in ("rtn", "hqq"):
        for b, size in sorted({(widths.get(n, bits), per_node.get(n, block_size)) for n in nodes}):
            mine = {n for n in nodes if (widths.get(n, bits), per_node.get(n, block_size)) == (b, size)}
            skip = sorted((set(nodes) - mine) | set(exclude))
            model = _matmul_nbits(model, b, size, accuracy_level, symmetric, skip, algorithm)
        if algorithm == "hqq":
            _set_accuracy_level(model, accuracy_level)  # HQQ writes none: the kernel would compute in fp32
    else:
        model = _neural_compressor(model, nodes, bits, block_size, per_node, accuracy_level, algorithm, feeds)
    embed_block = embed_block_size or block_size
    shared = share_quantized_embedding(model, embed_block, accuracy_level)
    save_model(model, dst)
    return {
        "tied_embedding": f"int8 GatherBlockQuantized + MatMulNBits sharing one tensor (block {shared})"
        if shared
        else "unchanged",
        "preset": f"int{bits}",
        "op": "MatMulNBits",
        "bits": bits,
        "block_size": block_size,
        "node_block_sizes": per_node,
        "node_bits": widths,
        "symmetric": symmetric and algorithm == "rtn",
        "algorithm": algorithm,
        "calibration_feeds": len(feeds or []) if algorithm == "gptq" else 0,
        "accuracy_level": accuracy_level,
        "nodes_kept_fp32": sorted(exclude),
    }


def _matmul_nbits(model, bits: int, block_size: int, accuracy_level: int, symmetric: bool, skip, algorithm: str):
    """One ``MatMulNBitsQuantizer`` pass (rtn or hqq) over every constant-weight MatMul not in ``skip``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=list(skip),
        algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits) if algorithm == "hqq" else None,
    )
    quantizer.process()
    return quantizer.model.model


def _neural_compressor(model, nodes, bits, block_size, per_node, accuracy_level, algorithm, feeds):
    """k-quant or GPTQ through the functions onnxruntime's ``KQuantWeightOnlyQuantConfig`` /
    ``GPTQWeightOnlyQuantConfig`` run (``onnxruntime.quantization.neural_compressor``), given one
    config per node: its block size, and ``fp32`` for the nodes left alone (the quantizer's own GPTQ
    path ignores ``nodes_to_exclude``). ``per_node`` is updated in place with the block sizes used."""
    import contextlib
    import io

    from onnxruntime.quantization.neural_compressor.weight_only import rtn_quantize

    if bits != 4:
        raise ValueError(f"{algorithm} writes 4-bit MatMulNBits only, not {bits}-bit")
    mine = set(nodes)
    # Asymmetric for both: k-quant always fits a zero point, and onnxruntime's GPTQ re-rounds its result
    # on a symmetric grid of another convention than its search's (on the tiny test model its logit error
    # was 1.3x round-to-nearest's symmetric, 0.8x asymmetric). Their 4-bit zero points are packed two to
    # a byte across columns, right only when each column has an even number of blocks: a node with an
    # odd count takes half the block size (SmolLM2's 576 inputs: 9 blocks of 64, 18 of 32).
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name in mine and n.input[1] in inits:
            k, size = inits[n.input[1]].dims[0], per_node.get(n.name, block_size)
            while -(-k // size) % 2 and size > 16:
                size //= 2
            if -(-k // size) % 2:
                raise ValueError(
                    f"{algorithm} int4 needs an even number of blocks per column: {n.name} has {k} inputs "
                    f"in blocks of {size}; pick another block size"
                )
            if size != per_node.get(n.name, block_size):
                per_node[n.name] = size
    config: dict = {
        n.name: {"bits": 4, "group_size": per_node.get(n.name, block_size), "scheme": "asym"}
        if n.name in mine
        else "fp32"
        for n in model.graph.node
        if n.op_type == "MatMul"
    }
    # Their topological sort starts from every graph input's consumers and fails on an input nothing
    # reads (``position_ids`` of a graph whose attention computes positions itself): set those aside.
    inputs = list(model.graph.input)
    read = {i for n in model.graph.node for i in n.input}
    unused = {i.name for i in inputs if i.name not in read}
    del model.graph.input[:]
    model.graph.input.extend(i for i in inputs if i.name not in unused)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)  # an INFO line per MatMul
    with contextlib.redirect_stdout(io.StringIO()):  # and a progress bar
        if algorithm == "kquant":
            out = rtn_quantize(model, config, algorithm="k_quant", accuracy_level=accuracy_level).model
        else:
            out = _gptq(model, config, [{k: v for k, v in f.items() if k not in unused} for f in feeds], accuracy_level)
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def _gptq(model, config: dict, feeds: list[dict], accuracy_level: int):
    """GPTQ with onnxruntime's own pieces (``neural_compressor.weight_only``: ``gptq``, ``quant_tensor``,
    ``make_matmul_weight_only_node``), the same steps as its ``gptq_quantize`` but with the layer inputs
    captured in ONE forward pass per feed: ``gptq_quantize`` runs the whole model once per distinct
    MatMul input and feed (SmolLM2-135M, 32 feeds: 120 × 32 forward passes, about an hour on one core).
    Each weight's Hessian is the same running average of its input's outer products."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor.onnx_model import ONNXModel
    from onnxruntime.quantization.neural_compressor.weight_only import (
        gptq,
        make_matmul_weight_only_node,
        pad_tensor,
        quant_tensor,
    )

    m = ONNXModel(model)
    targets = [
        n
        for n in m.nodes()
        if n.op_type == "MatMul" and config.get(n.name, "fp32") != "fp32" and m.get_initializer(n.input[1]) is not None
    ]
    names = sorted({n.input[0] for n in targets})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.ValueInfoProto(name=name) for name in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del probe
    hessians: dict[str, np.ndarray] = {}
    seen = 0
    for feed in feeds:
        values = session.run(names, feed)
        batch = values[0].shape[0]
        for name, x in zip(names, values):
            x = np.sqrt(2 / (seen + batch)) * x.reshape(-1, x.shape[-1]).astype(np.float64)
            h = hessians.get(name)
            hessians[name] = x.T @ x + (h * (seen / (seen + batch)) if h is not None else 0)
        seen += batch
    del session
    for node in targets:
        weight_tensor = m.get_initializer(node.input[1])
        weight = numpy_helper.to_array(weight_tensor).copy()
        c = config[node.name]
        group, scheme = c["group_size"], c["scheme"]
        q = gptq(weight, hessians[node.input[0]], num_bits=4, group_size=group, scheme=scheme, blocksize=128)
        k_blocks = (weight.shape[0] + group - 1) // group
        q, scale, zp = quant_tensor(pad_tensor(q, group, k_blocks).T, 4, group, scheme, "uint")
        q_node, inits = make_matmul_weight_only_node(
            node=node,
            weight_shape=weight.shape,
            num_bits=4,
            group_size=group,
            k_blocks=k_blocks,
            q_weight=q.astype("uint8"),
            scale=scale.astype(weight.dtype),
            zero_point=zp if scheme == "asym" else None,
            accuracy_level=accuracy_level,
        )
        shared = m.get_initializer_share_num(node.input[1])  # counted while this node still reads it
        m.add_initializers(inits)
        m.remove_node(node)
        m.add_node(q_node)
        if shared == 1:
            m.remove_initializer(weight_tensor)
    m.topological_sort()
    return m.model


def _set_accuracy_level(model, level: int) -> None:
    """Give every ``MatMulNBits`` node without one the ``accuracy_level`` attribute (4: int8 compute)."""
    import onnx

    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def save_model(model, dst: Path) -> None:
    """Save ``model``; weights go to external data past protobuf's 2 GB limit."""
    import onnx

    from distill.export.onnx_export import strip_node_metadata

    strip_node_metadata(model)
    onnx.save(model, str(dst), save_as_external_data=model.ByteSize() > 1.8e9)


def quantize_static_int8(
    src: Path,
    dst: Path,
    feeds: list[dict],
    exclude: list[str] = (),
    only: list[str] | None = None,
    calibrate_method: str = "MinMax",
    embed_block_size: int | None = 32,
) -> dict:
    """Static int8 in QDQ format: per-channel symmetric int8 weights, uint8 activations with ranges
    calibrated on ``feeds`` (prefill inputs from the distilled dataset). Quantizes constant-weight
    MatMuls except ``exclude`` (or only the nodes in ``only``); the tied embedding / LM head becomes
    one shared blockwise int8 tensor of block ``embed_block_size`` (None: left fp32). Returns the
    config used (saved next to the model)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from distill.export.calibration import FeedReader, crop_feeds

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    # The tied LM head reads Transpose(embedding); left to quantize_static it would get a per-tensor
    # activation-quantized weight. It becomes the shared blockwise int8 tensor below instead.
    skip = list(exclude) + tied_head_matmuls(src)
    if calibrate_method != "MinMax":
        feeds = crop_feeds(feeds)
    with tempfile.TemporaryDirectory(prefix="distill_calib_") as tmp:
        quantize_static(
            str(src),
            str(Path(tmp) / "qdq.onnx"),
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(only) if only is not None else None,
            nodes_to_exclude=skip,
            calibrate_method=CalibrationMethod[calibrate_method],
            extra_options={"MatMulConstBOnly": True, "CalibTensorRangeSymmetric": False},
        )
        model = onnx.load(str(Path(tmp) / "qdq.onnx"))
    shared = share_quantized_embedding(model, embed_block_size, 4) if embed_block_size else 0
    save_model(model, dst)
    return {
        "preset": "int8_static",
        "format": "QDQ",
        "per_channel": True,
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "calibrate_method": calibrate_method,
        "calibration_examples": len(feeds),
        "calibration": "prefill (no past) of training prompts + targets through the chat template",
        "tied_embedding": f"int8 GatherBlockQuantized + MatMulNBits (block {shared})" if shared else "unchanged",
        "nodes_kept_fp32": sorted(exclude),
    }


def convert_fp16(src: Path, dst: Path) -> dict:
    """Half-precision weights and compute; graph inputs and outputs keep fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_model(model, dst)
    return {"preset": "fp16", "keep_io_types": True}


PRESETS = ("int8", "int4", "int4_mixed", "int8_dynamic", "int8_static", "fp16")
CALIBRATE_METHODS = ("MinMax", "Entropy", "Percentile")
WEIGHT_ONLY_ALGORITHMS = ("rtn", "hqq", "kquant", "gptq")
# The settings each preset reads: what ``to_dict`` saves and its named constructor takes.
_SETTINGS = {
    "int8": ("block_size", "group_block_sizes", "embed_block_size", "keep_fp32"),
    "int4": ("block_size", "group_block_sizes", "embed_block_size", "keep_fp32", "algorithm", "symmetric"),
    "int4_mixed": ("block_size", "group_block_sizes", "embed_block_size", "keep_fp32", "int8_groups"),
    "int8_dynamic": ("keep_fp32", "keep_groups"),
    "int8_static": ("keep_groups", "calibrate_method", "embed_block_size", "keep_fp32"),
    "fp16": (),
}
# MLP projections at block 64: SmolLM2-135M int8 size ratio 0.269 at 97.8% top-1 (BENCHMARKS.md).
MLP_BLOCKS = (("gate", 64), ("up", 64), ("down", 64))


def _block_pairs(sizes: Mapping[str, int] | Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """``{group: block}`` as pairs in ``LINEAR_GROUPS`` order (a frozen, comparable field)."""
    sizes = dict(sizes)
    unknown = set(sizes) - set(LINEAR_GROUPS)
    if unknown:
        raise ValueError(f"group_block_sizes: unknown groups {sorted(unknown)} (one of {', '.join(LINEAR_GROUPS)})")
    return tuple((g, int(sizes[g])) for g in LINEAR_GROUPS if g in sizes)


@dataclass(frozen=True)
class QuantPreset:
    """One quantization preset and its settings. Build it with a named constructor
    (``QuantPreset.int8()``, ``.int4()``, ``.int8_dynamic()``, ``.int8_static()``, ``.fp16()``); ``make_variant``
    applies it. Groups are projection names (``LINEAR_GROUPS``), resolved to nodes per model."""

    preset: str
    block_size: int = 32  # int8/int4: block of the weight-only quantization
    group_block_sizes: tuple[tuple[str, int], ...] = ()  # int8/int4: (group, block) pairs overriding it
    embed_block_size: int | None = None  # shared tied embedding / LM head; None: block_size (int8/int4), fp32 (static)
    keep_fp32: tuple[str, ...] = ()  # MatMul node names left fp32
    keep_groups: tuple[str, ...] = ()  # int8_dynamic/int8_static: projection groups left fp32
    calibrate_method: str = "MinMax"  # int8_static: activation range calibration
    algorithm: str = "rtn"  # int8/int4: rtn (round to nearest), hqq, kquant (fitted scale and zero point) or gptq
    symmetric: bool = True  # int4 rtn: a grid without zero points
    int8_groups: tuple[str, ...] = ()  # int4_mixed: projection groups kept in blockwise int8

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown quantization preset {self.preset!r} (one of {', '.join(PRESETS)})")
        if self.algorithm not in WEIGHT_ONLY_ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: one of {', '.join(WEIGHT_ONLY_ALGORITHMS)}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ValueError(f"calibrate_method {self.calibrate_method!r}: one of {', '.join(CALIBRATE_METHODS)}")
        for name in ("keep_groups", "int8_groups"):
            unknown = set(getattr(self, name)) - set(LINEAR_GROUPS)
            if unknown:
                raise ValueError(f"{name}: unknown groups {sorted(unknown)} (one of {', '.join(LINEAR_GROUPS)})")

    @property
    def bits(self) -> int:
        """Weight bits: 4 for int4, 8 for the int8 presets, 16 for fp16."""
        return {"int4": 4, "int4_mixed": 4, "fp16": 16}.get(self.preset, 8)

    @classmethod
    def int8(
        cls,
        block_size: int = 32,
        group_block_sizes: Mapping[str, int] | Iterable[tuple[str, int]] = MLP_BLOCKS,
        embed_block_size: int | None = 64,
        keep_fp32: Iterable[str] = (),
    ) -> QuantPreset:
        """Weight-only blockwise int8 (``MatMulNBits``, int8 compute), the tied embedding shared as int8."""
        return cls._weight_only("int8", block_size, group_block_sizes, embed_block_size, keep_fp32)

    @classmethod
    def int4(
        cls,
        block_size: int = 32,
        group_block_sizes: Mapping[str, int] | Iterable[tuple[str, int]] = MLP_BLOCKS,
        embed_block_size: int | None = 64,
        keep_fp32: Iterable[str] = (),
        algorithm: str = "rtn",
        symmetric: bool = True,
    ) -> QuantPreset:
        """Weight-only blockwise int4 (``MatMulNBits`` bits=4), the tied embedding shared as int8;
        ``algorithm`` rtn, hqq, kquant or gptq (calibrated: ``make_variant`` needs feeds)."""
        symmetric = symmetric and algorithm == "rtn"  # hqq, k-quant and gptq always fit zero points
        return cls._weight_only(
            "int4", block_size, group_block_sizes, embed_block_size, keep_fp32, algorithm, symmetric=symmetric
        )

    @classmethod
    def int4_mixed(
        cls,
        int8_groups: Iterable[str],
        block_size: int = 32,
        group_block_sizes: Mapping[str, int] | Iterable[tuple[str, int]] = MLP_BLOCKS,
        embed_block_size: int | None = 64,
        keep_fp32: Iterable[str] = (),
    ) -> QuantPreset:
        """int4 (round to nearest) except ``int8_groups``, kept in blockwise int8 — the groups a
        sensitivity sweep on the distilled data finds most hurt by int4 (``sensitivity.int4_group_sweep``)."""
        return cls._weight_only(
            "int4_mixed", block_size, group_block_sizes, embed_block_size, keep_fp32, int8_groups=tuple(int8_groups)
        )

    @classmethod
    def _weight_only(
        cls, preset, block_size, group_block_sizes, embed_block_size, keep_fp32, algorithm="rtn", **more
    ) -> QuantPreset:
        return cls(
            preset,
            block_size=block_size,
            group_block_sizes=_block_pairs(group_block_sizes),
            embed_block_size=embed_block_size,
            keep_fp32=tuple(keep_fp32),
            algorithm=algorithm,
            **more,
        )

    @classmethod
    def int8_dynamic(cls, keep_fp32: Iterable[str] = (), keep_groups: Iterable[str] = ("down",)) -> QuantPreset:
        """``quantize_dynamic`` int8; by default the MLP down-projections stay fp32 (their inputs carry
        the activation outliers one per-tensor scale cannot represent, found by a per-group sweep)."""
        return cls("int8_dynamic", keep_fp32=tuple(keep_fp32), keep_groups=tuple(keep_groups))

    @classmethod
    def int8_static(
        cls,
        keep_groups: Iterable[str] = ("down",),
        calibrate_method: str = "MinMax",
        embed_block_size: int | None = 64,
        keep_fp32: Iterable[str] = (),
    ) -> QuantPreset:
        """Static QDQ int8 calibrated on feeds; ``keep_groups`` stay fp32 (the most sensitive per the
        sweep), the tied embedding becomes blockwise int8 of ``embed_block_size`` (None: left fp32)."""
        return cls(
            "int8_static",
            embed_block_size=embed_block_size,
            keep_fp32=tuple(keep_fp32),
            keep_groups=tuple(keep_groups),
            calibrate_method=calibrate_method,
        )

    @classmethod
    def fp16(cls) -> QuantPreset:
        """Every float tensor in half precision; graph inputs and outputs stay fp32."""
        return cls("fp16")

    def to_dict(self) -> dict:
        """``{"preset": ..., <the settings this preset reads>}``, JSON-ready (weight-only presets add ``bits``)."""
        d: dict = {"preset": self.preset}
        if self.preset in ("int8", "int4", "int4_mixed"):
            d["bits"] = self.bits
        for name in _SETTINGS[self.preset]:
            value = getattr(self, name)
            d[name] = dict(value) if name == "group_block_sizes" else list(value) if isinstance(value, tuple) else value
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> QuantPreset:
        """The preset ``to_dict`` wrote, through its named constructor (a missing setting takes the
        constructor's default). Also reads a saved variant config (``model.int8.quant.json``), whose
        other keys record what the quantizer did."""
        preset = d.get("preset")
        if preset not in _SETTINGS:
            raise ValueError(f"unknown quantization preset {preset!r} (one of {', '.join(PRESETS)})")
        return getattr(cls, preset)(**{k: d[k] for k in _SETTINGS[preset] if k in d})


def quant_config_file(model_file: str) -> str:
    """Name of the config saved beside a variant: ``model.int8.onnx`` → ``model.int8.quant.json``."""
    return f"{model_file.removesuffix('.onnx')}.quant.json"


def make_variant(preset: QuantPreset, src: Path, dst: Path, feeds: list[dict] | None = None) -> dict:
    """Write ``preset``'s variant of ``src`` to ``dst`` and the config that produced it beside it
    (``quant_config_file``); returns that config: the quantizer's record (nodes kept fp32, block size
    per node, tied embedding, ...) and ``preset.to_dict()``. Projection groups resolve to node names by
    ``linear_groups`` (none on an unknown layout). ``feeds``: calibration inputs (int8_static, int4 gptq)."""
    groups = linear_groups(src)
    kept = [*preset.keep_fp32, *(n for g in preset.keep_groups for n in groups.get(g, []))]
    if preset.preset in ("int8", "int4", "int4_mixed"):
        blocks = {n: b for g, b in preset.group_block_sizes for n in groups.get(g, [])}
        if preset.int8_groups and not all(groups.get(g) for g in preset.int8_groups):
            raise ValueError("int4_mixed needs the projection groups of a known layout (linear_groups found none)")
        record = quantize_weight_only(
            src,
            dst,
            preset.bits,
            preset.block_size,
            4,
            kept,
            blocks,
            preset.embed_block_size,
            preset.algorithm,
            feeds=feeds if preset.algorithm == "gptq" else None,
            node_bits={n: 8 for g in preset.int8_groups for n in groups[g]},
            symmetric=preset.symmetric,
        )
        if preset.int8_groups:
            record["int8_groups"] = list(preset.int8_groups)
    elif preset.preset == "int8_dynamic":
        record = quantize_dynamic_int8(src, dst, kept)
    elif preset.preset == "int8_static":
        if not feeds:
            raise ValueError("int8_static needs calibration feeds")
        record = quantize_static_int8(src, dst, feeds, kept, None, preset.calibrate_method, preset.embed_block_size)
        record["static_keep_groups"] = list(preset.keep_groups)  # the key runs before QuantPreset wrote
    else:
        record = convert_fp16(src, dst)
    config = {**record, **preset.to_dict()}
    write_json(dst.with_name(quant_config_file(dst.name)), config)
    return config


def share_quantized_embedding(model, block_size: int = 32, accuracy_level: int = 4) -> int:
    """Quantize a tied embedding / LM head once to blockwise int8 and use it for both.

    Finds ``Gather(W, ids)`` and ``MatMul(h, Transpose(W))`` on the same fp32 initializer ``W``
    [vocab, hidden] and rewrites them to ``GatherBlockQuantized`` and ``MatMulNBits`` reading one
    uint8 tensor (symmetric, zero point 128) and one scale tensor — the tied weight stays stored once, now at a quarter
    of the size. The block is halved until it divides the hidden size (576 = 9 × 64 takes 64, not 128).
    Returns the block size used, 0 (model untouched) when the pattern is absent. Edits ``model`` in place.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for gather in [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits]:
        w_name = gather.input[0]
        users = consumers.get(w_name, [])
        transposes = [n for n in users if n.op_type == "Transpose"]
        if len(users) != 2 or len(transposes) != 1:
            continue
        matmuls = [n for n in consumers.get(transposes[0].output[0], []) if n.op_type == "MatMul"]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if len(matmuls) != 1 or w.ndim != 2:
            continue
        while block_size > 16 and w.shape[1] % block_size:
            block_size //= 2
        if w.shape[1] % block_size:
            continue
        vocab, hidden = w.shape
        blocks = w.reshape(vocab, hidden // block_size, block_size)
        scale = np.abs(blocks).max(-1) / 127.0
        scale[scale == 0] = 1.0
        q = (np.clip(np.round(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        base = w_name.replace(".", "_")
        # One scale tensor, stored once: [vocab, blocks] as MatMulNBits reads it, reshaped at load
        # time (constant-folded) to the [vocab, blocks, 1] GatherBlockQuantized wants. No zero-point
        # tensor: GatherBlockQuantized's default for uint8 is 128.
        new_inits = [
            numpy_helper.from_array(q, f"{base}_q8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{base}_q8_scales"),
            numpy_helper.from_array(np.array([vocab, hidden // block_size, 1], np.int64), f"{base}_q8_scales_shape"),
            numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{base}_q8_shape"),
        ]
        gathered = f"{gather.output[0]}_blocks"
        new_nodes = [
            helper.make_node(
                "Reshape",
                [f"{base}_q8_scales", f"{base}_q8_scales_shape"],
                [f"{base}_q8_scales3d"],
                name=f"{gather.name}_scales3d",
            ),
            helper.make_node(
                "GatherBlockQuantized",
                [f"{base}_q8", gather.input[1], f"{base}_q8_scales3d"],
                [gathered],
                name=f"{gather.name}_q8",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=2,
                block_size=block_size,
                bits=8,
            ),
            helper.make_node(
                "Reshape", [gathered, f"{base}_q8_shape"], [gather.output[0]], name=f"{gather.name}_reshape"
            ),
            helper.make_node(
                "MatMulNBits",
                [matmuls[0].input[0], f"{base}_q8", f"{base}_q8_scales"],
                [matmuls[0].output[0]],
                name=f"{matmuls[0].name}_q8",
                domain="com.microsoft",
                K=hidden,
                N=vocab,
                bits=8,
                block_size=block_size,
                accuracy_level=accuracy_level,
            ),
        ]
        # Substitute in place so the graph stays topologically sorted.
        replace = {id(gather): new_nodes[:3], id(transposes[0]): [], id(matmuls[0]): new_nodes[3:]}
        kept = [m for n in g.node for m in replace.get(id(n), [n])]
        del g.node[:]
        g.node.extend(kept)
        g.initializer.remove(inits[w_name])
        g.initializer.extend(new_inits)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        return block_size
    return 0
