"""Messages: what requests and replies say, as bytes. No pickle, no npz parsing on the hot path.

    u32 header length | JSON header | array bytes, back to back

The JSON header is an object with `op` (the request) or `ok` (the reply), its fields, and
`arrays`: a list of {name, dtype, shape} in the order their bytes follow. Only plain numeric
dtypes are accepted, and the byte count must match the shapes exactly.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

HEADER_LEN = struct.Struct(">I")
MAX_HEADER = 64 * 1024
DTYPES = {"float32", "float64", "int64", "int32", "uint8"}

# Requests the device server answers. Each is idempotent, so the client may repeat any of them
# after a reconnect: uploads name their offset, training names the step it expects to apply.
OPS = ("info", "status", "upload_begin", "upload_chunk", "upload_end", "train", "infer", "evaluate",
       "checkpoint", "fetch_begin", "fetch_chunk", "profile", "reset", "scratch_begin", "scratch_end")


class MessageError(ValueError):
    """A message that cannot be decoded; the server answers it with an error reply."""


@dataclass
class Message:
    fields: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)


def encode(fields: dict, arrays: dict[str, np.ndarray] | None = None, blob: bytes | None = None) -> bytes:
    """`blob` travels as a uint8 array named 'blob' (bundle chunks), without a copy into numpy."""
    specs, parts = [], []
    for name, a in (arrays or {}).items():
        a = np.asarray(a)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")     # (np.ascontiguousarray would turn a 0-d array 1-d)
        if a.dtype.name not in DTYPES:
            raise MessageError(f"array '{name}' has dtype {a.dtype}, not one of {sorted(DTYPES)}")
        specs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        parts.append(a.tobytes())
    if blob is not None:
        specs.append({"name": "blob", "dtype": "uint8", "shape": [len(blob)]})
        parts.append(bytes(blob))
    header = json.dumps({**fields, "arrays": specs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        # refused here, by the side that made it, rather than as an unreadable message over there
        raise MessageError(f"message header of {len(header)} bytes exceeds {MAX_HEADER} "
                           "(long series belong in arrays: see lists_to_arrays)")
    return b"".join([HEADER_LEN.pack(len(header)), header, *parts])


def decode(data: bytes) -> Message:
    if len(data) < HEADER_LEN.size:
        raise MessageError("message shorter than its length prefix")
    (n,) = HEADER_LEN.unpack_from(data)
    if n > MAX_HEADER or HEADER_LEN.size + n > len(data):
        raise MessageError(f"message header length {n} is out of bounds")
    try:
        fields = json.loads(data[HEADER_LEN.size:HEADER_LEN.size + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"message header is not JSON ({type(exc).__name__})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("arrays", []), list):
        raise MessageError("message header must be an object with an 'arrays' list")
    arrays, pos = {}, HEADER_LEN.size + n
    for spec in fields.pop("arrays", []):
        try:
            name, dtype, shape = spec["name"], spec["dtype"], tuple(spec["shape"])
            ok = (isinstance(name, str) and dtype in DTYPES and len(shape) <= 4
                  and all(type(d) is int and 0 <= d < 1 << 31 for d in shape))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise MessageError(f"bad array description {str(spec)[:80]}")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize     # Python ints: no wrap-around
        if pos + nbytes > len(data):
            raise MessageError(f"array '{name}' runs past the end of the message")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                     offset=pos).reshape(shape)
        pos += nbytes
    if pos != len(data):
        raise MessageError(f"{len(data) - pos} bytes after the last array")
    return Message(fields, arrays)


def _is_number(value) -> bool:
    """A real number of Python's or numpy's (not a bool: True is no measurement)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def lists_to_arrays(fields: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Move every list of numbers (at any depth) out of `fields` into float64 arrays, leaving
    {"$array": name} in its place: long series (a profile's samples) would not fit the JSON header.
    A numpy scalar left elsewhere becomes the plain Python number it holds, so that what stays in
    the header is plain JSON (a list of numpy floats once stayed there and outgrew it)."""
    arrays: dict[str, np.ndarray] = {}

    def walk(value, path):
        if isinstance(value, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
            value = value.tolist()
        if isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            arrays[path] = np.asarray(value, dtype=np.float64)
            return {"$array": path}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value
    return walk(fields, ""), arrays


def arrays_to_lists(fields: dict, arrays: dict[str, np.ndarray]) -> dict:
    """The inverse of lists_to_arrays (numbers come back as floats)."""
    def walk(value):
        if isinstance(value, dict):
            if set(value) == {"$array"}:
                name = value["$array"]
                if name not in arrays:
                    raise MessageError(f"reply names a missing array {str(name)[:40]!r}")
                return arrays[name].tolist()
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value
    return walk(fields)


def error_reply(code: str, message: str) -> bytes:
    return encode({"ok": False, "code": code, "error": message})
