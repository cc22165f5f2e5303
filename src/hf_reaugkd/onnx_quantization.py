"""int8 quantization of an exported graph whose answer for a text does not depend on the texts batched with it.

ONNX Runtime's dynamic quantization scales each activation tensor by its range over the whole (padded) batch, so a
text's int8 label and neighbours changed with its batch (at batch 32, 48 of 50 labels and 18% of the neighbour lists
matched batch 1). Here every MatMul (and Gemm) with a constant 2-D weight `W (K, N)` becomes

    q_x = round(x / s_x)  with  s_x = max|x| / 127 over the row's own K values      (one scale per row: per token)
    y   = (q_x @ q_W) · s_x · s_W  with  q_W = round(W / s_W),  s_W = max|W| / 127 per column (per channel)

`q_x @ q_W` is an integer product (ONNX Runtime's `MatMulIntegerToFloat`, which also applies both scales and the
bias), exact whatever the batch or its blocking, and the scales are per row and per column, so each row's result
depends on that row alone. Symmetric (the same zero point for every row): the kernel takes one zero point per
tensor. Per-token scales are also the more accurate choice for transformer activations, whose range varies from
token to token (LLM.int8, ZeroQuant). The price is speed: the row scales are computed by separate nodes where ONNX
Runtime fuses its per-tensor ones (benchmarks/int8_batches.py).
"""

import numpy as np

INT8_MAX = 127.0
# Rows are stored as uint8 around one fixed zero point: the same symmetric values, in the uint8 × int8 product that
# ONNX Runtime's kernels are fast at (int8 × int8 ran 6× slower). One zero point for every row is what its integer
# products take; the per-row part is the scale.
ZERO_POINT, ZERO_POINT_NAME = 128, "per_row_zero_point"
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators: MatMulIntegerToFloat
SMALLEST_SCALE = 1e-12  # an all-zero row or column: its scale only has to avoid a division by zero
# The graph's constants for every quantized row: name -> (value, dtype)
CONSTANTS = {
    ZERO_POINT_NAME: (ZERO_POINT, np.uint8),
    "per_row_axes": ([-1], np.int64),  # the row: the last axis
    "per_row_floor": (SMALLEST_SCALE * INT8_MAX, np.float32),  # the smallest range a row is scaled by
    "per_row_int8_max": (INT8_MAX, np.float32),
    "per_row_unit": (1.0, np.float32),  # QuantizeLinear's scale: the values are scaled already
}


def quantize_per_row(model, onnx) -> int:
    """Rewrite `model` (an `onnx.ModelProto`) in place as the module docstring says; returns how many MatMul / Gemm
    nodes were quantized. Activations shared by several products (the attention's Q, K and V) are quantized once."""
    graph = model.graph
    weights = {initializer.name: initializer for initializer in graph.initializer}
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    quantized_inputs: dict[str, tuple[str, str]] = {}  # activation name -> (uint8 tensor, its per-row scales)
    nodes, count = [], 0
    graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(value, dtype=dtype), name) for name, (value, dtype) in CONSTANTS.items()
    )
    for node in graph.node:
        weight = _constant_weight(node, weights, onnx)
        if weight is None:
            nodes.append(node)
            continue
        count += 1
        name = node.name or f"{node.op_type}_{count}"
        activation = node.input[0]
        if activation not in quantized_inputs:
            quantized_inputs[activation] = _quantize_rows(activation, f"{name}_rows", nodes, onnx, opset)
        rows, row_scales = quantized_inputs[activation]
        column_scales = np.maximum(np.abs(weight).max(axis=0), SMALLEST_SCALE) / INT8_MAX  # (N,)
        int8_weight = np.round(weight / column_scales).astype(np.int8)  # (K, N)
        graph.initializer.extend([
            onnx.numpy_helper.from_array(int8_weight, f"{name}_int8_weight"),
            onnx.numpy_helper.from_array(column_scales.astype(np.float32), f"{name}_column_scales"),
        ])  # fmt: skip
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        inputs = [rows, f"{name}_int8_weight", row_scales, f"{name}_column_scales", ZERO_POINT_NAME, "", bias]
        nodes.append(
            onnx.helper.make_node(
                "MatMulIntegerToFloat",
                inputs[: 7 if bias else 5],
                [node.output[0]],
                name=f"{name}_int8",
                domain=MS_DOMAIN,
            )
        )
    if count and not any(entry.domain == MS_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}  # the replaced nodes' fp32 weights go
    kept = [initializer for initializer in graph.initializer if initializer.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def _constant_weight(node, weights: dict, onnx) -> np.ndarray | None:
    """The `(K, N)` fp32 weight of a MatMul `x @ W` or a plain Gemm `x @ W (+ C)` (or `x @ Wᵀ`) with a constant 2-D
    `W`; None for any other node (the attention's products of two activations, a scaled or transposed-input Gemm)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in weights:
        return None
    weight = onnx.numpy_helper.to_array(weights[node.input[1]])
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if node.op_type == "Gemm":
        attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        if attributes.get("transB", 0):
            weight = weight.T
    return np.ascontiguousarray(weight)


def _quantize_rows(activation: str, prefix: str, nodes: list, onnx, opset: int) -> tuple[str, str]:
    """Append the nodes that quantize `activation` `(..., K)` per row: its int8 values and scales `(..., 1)`."""
    make = onnx.helper.make_node
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        reduce = make("ReduceMax", [f"{prefix}_abs", "per_row_axes"], [f"{prefix}_max"], keepdims=1)
    else:
        reduce = make("ReduceMax", [f"{prefix}_abs"], [f"{prefix}_max"], axes=[-1], keepdims=1)
    nodes += [
        make("Abs", [activation], [f"{prefix}_abs"]),
        reduce,  # (..., 1)
        make("Max", [f"{prefix}_max", "per_row_floor"], [f"{prefix}_range"]),
        make("Div", [f"{prefix}_range", "per_row_int8_max"], [f"{prefix}_scales"]),  # (..., 1)
        make("Div", ["per_row_int8_max", f"{prefix}_range"], [f"{prefix}_inverse_scales"]),  # (..., 1)
        make("Mul", [activation, f"{prefix}_inverse_scales"], [f"{prefix}_scaled"]),  # within ±127
        # round half to even, shift by the zero point and cast, in one kernel
        make("QuantizeLinear", [f"{prefix}_scaled", "per_row_unit", ZERO_POINT_NAME], [f"{prefix}_uint8"]),
    ]
    return f"{prefix}_uint8", f"{prefix}_scales"
