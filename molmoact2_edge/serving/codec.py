"""msgpack with numpy arrays, byte for byte as openpi's ``openpi_client.msgpack_numpy``; never pickle.

An array travels as the map ``{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": shape}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": item, b"dtype":
dtype.str}`` (``../shared/reference/deployment-2026-12.md`` §2). Packing uses msgpack's defaults,
as openpi's ``Packer`` does, so our bytes equal theirs.

Unpacking is stricter than openpi's because it faces the network: only bool, integer and float
dtypes are accepted (object, void, complex, datetime and string arrays are refused: an object
dtype is how pickle-based codecs execute code), the data length must match dtype and shape, and
msgpack's own container limits bound what a message may hold before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from molmoact2_edge.errors import CodecError

# dtype kinds that may cross the wire: bool, signed, unsigned, float.
ALLOWED_KINDS = frozenset("biuf")


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise CodecError(f"refusing to send dtype {obj.dtype}: only plain numeric arrays cross the wire")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, str, numbers, numpy arrays and scalars) as msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_pack_default)
    except TypeError as err:
        raise CodecError(str(err)) from err


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on one incoming message, enforced while parsing (before arrays are built)."""

    max_bytes: int = 64 << 20
    max_str_len: int = 4096  # prompts, dict keys, dtype strings
    max_map_len: int = 64
    max_array_len: int = 16  # msgpack lists: array shapes (ndim)


def _dtype(value: Any) -> np.dtype:
    if not isinstance(value, str):
        raise CodecError(f"array dtype must be a string like '<f4', got {type(value).__name__}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as err:
        raise CodecError(f"unknown dtype {value!r}") from err
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CodecError(f"dtype {value!r} ({dtype}) is refused: only bool, integer and float arrays are accepted")
    return dtype


def _unpack_hook(obj: dict[Any, Any]) -> Any:
    if b"__ndarray__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        data, shape = obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes):
            raise CodecError("array data must be raw bytes")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CodecError(f"array shape must be a list of non-negative ints, got {shape!r}")
        expected = math.prod(shape) * dtype.itemsize  # Python ints: a crafted shape cannot overflow
        if expected != len(data):
            raise CodecError(f"array of shape {tuple(shape)} {dtype} needs {expected} bytes, message has {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as err:
            raise CodecError(f"bad numpy scalar of dtype {dtype}: {err}") from err
    return obj


def unpackb(data: bytes, limits: UnpackLimits = UnpackLimits()) -> Any:
    """Parse one message; arrays come back read-only (views of the message). Raises CodecError."""
    if len(data) > limits.max_bytes:
        raise CodecError(f"message of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        return msgpack.unpackb(
            data,
            object_hook=_unpack_hook,
            max_bin_len=limits.max_bytes,
            max_str_len=limits.max_str_len,
            max_map_len=limits.max_map_len,
            max_array_len=limits.max_array_len,
            max_ext_len=0,
            strict_map_key=False,  # openpi's array maps have bytes keys
        )
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise CodecError(f"not a msgpack-numpy message: {err}") from err
