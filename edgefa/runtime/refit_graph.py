"""The refittable inference graph, derived on the device from infer.onnx and weights.npz.

TensorRT builds its refittable inference engine from the forward pass with the weights as
*initializers* (constants it can fold and store in FP16, later swapped by name with
trt.Refitter). A bundle carries that graph (tensorrt/infer_refit.onnx) only when exported with
`--tensorrt`: it is a second copy of every weight, and would double what a deploy sends. Without
it, the device derives the same graph here, where there is no `onnx` package: infer.onnx is a
protobuf message, so this edits its bytes directly (protobuf's wire format: tag = field << 3 |
wire type, then a varint, 8 or 4 bytes, or a length and that many bytes).

The edit, on ModelProto.graph (field 7): every graph input (GraphProto.input, field 11) named in
the weights is dropped, and a TensorProto initializer (GraphProto.initializer, field 5) with its
float32 values is added after any existing ones; the model's doc_string (field 6) says what it is.
Fields are written in field-number order, as protobuf itself writes them, so the result is the
exporter's exporters.onnx_graphs.refittable_infer_graph byte for byte (tests/test_tensorrt_engine.py).
"""

from __future__ import annotations

import numpy as np

from ..errors import EdgefaError

DOC = "edgefa forward pass with the weights as initializers (refittable in TensorRT): x -> logits"
MODEL_DOC_STRING, MODEL_GRAPH = 6, 7                               # ModelProto fields
GRAPH_INITIALIZER, GRAPH_INPUT = 5, 11                             # GraphProto fields
VALUE_INFO_NAME = 1                                                # ValueInfoProto.name
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9   # TensorProto fields
FLOAT = 1                                                          # TensorProto.DataType.FLOAT
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5                      # wire types


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise EdgefaError("infer.onnx: truncated protobuf (a varint runs past the end)")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, bytes, bytes | None]]:
    """A message's fields in order: (field number, the field's whole bytes, its payload for
    length-delimited fields else None)."""
    fields, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = None
        if wire == VARINT:
            _, pos = _varint(buf, pos)
        elif wire == FIXED64:
            pos += 8
        elif wire == FIXED32:
            pos += 4
        elif wire == LENGTH:
            size, pos = _varint(buf, pos)
            payload, pos = buf[pos:pos + size], pos + size
        else:
            raise EdgefaError(f"infer.onnx: unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise EdgefaError("infer.onnx: truncated protobuf (a field runs past the end)")
        fields.append((number, buf[start:pos], payload))
    return fields


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | LENGTH) + _encode_varint(len(payload)) + payload


def _tensor(name: str, array: np.ndarray) -> bytes:
    """A float32 TensorProto as numpy_helper.from_array writes it: dims, data_type, name, raw_data."""
    data = np.ascontiguousarray(array, dtype="<f4")
    out = b"".join(_encode_varint(TENSOR_DIMS << 3 | VARINT) + _encode_varint(int(d)) for d in data.shape)
    out += _encode_varint(TENSOR_DATA_TYPE << 3 | VARINT) + _encode_varint(FLOAT)
    return out + _length_field(TENSOR_NAME, name.encode()) + _length_field(TENSOR_RAW_DATA, data.tobytes())


def _input_name(value_info: bytes) -> str | None:
    return next((p.decode() for n, _, p in _fields(value_info) if n == VALUE_INFO_NAME and p is not None), None)


def _refit_graph_message(graph: bytes, weights: dict[str, np.ndarray]) -> bytes:
    fields = _fields(graph)
    inputs = [_input_name(p) for n, _, p in fields if n == GRAPH_INPUT]
    as_constants = [name for name in inputs if name in weights]
    if not as_constants:
        raise EdgefaError("infer.onnx: no graph input is a weight of the bundle; nothing to refit")
    new = b"".join(_length_field(GRAPH_INITIALIZER, _tensor(n, weights[n])) for n in as_constants)
    out, placed = bytearray(), False
    for number, whole, payload in fields:
        if not placed and number > GRAPH_INITIALIZER:
            out += new
            placed = True
        if number == GRAPH_INPUT and _input_name(payload) in weights:
            continue
        out += whole
    if not placed:
        out += new
    return bytes(out)


def refit_graph_bytes(infer_onnx: bytes, weights: dict[str, np.ndarray]) -> bytes:
    """infer.onnx's bytes with every graph input named in `weights` made an initializer holding
    its values (what tensorrt/infer_refit.onnx holds when the bundle carries it)."""
    out, placed_doc, seen_graph = bytearray(), False, False
    for number, whole, payload in _fields(infer_onnx):
        if number == MODEL_DOC_STRING:
            continue                                   # replaced below, in field order
        if not placed_doc and number > MODEL_DOC_STRING:
            out += _length_field(MODEL_DOC_STRING, DOC.encode())
            placed_doc = True
        if number == MODEL_GRAPH:
            out += _length_field(MODEL_GRAPH, _refit_graph_message(payload, weights))
            seen_graph = True
        else:
            out += whole
    if not seen_graph:
        raise EdgefaError("infer.onnx: no graph in the model")
    if not placed_doc:
        out += _length_field(MODEL_DOC_STRING, DOC.encode())
    return bytes(out)
