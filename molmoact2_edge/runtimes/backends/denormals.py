"""Flush denormals to zero on the calling thread while a CPU graph runs (x86-64 and aarch64 Linux).

Every masked attention in a bundle (the prefill's causal mask, the flow's cross-attention over a
padded prompt, decode_block's causal block) adds a large negative bias, so the softmax takes
exp() of values far below -87, whose float32 results are denormals. On x86 each denormal
operation takes a microcode assist (a decode_block call with the real mask ran as fast as with a
mask too mild to underflow once the flush was on, and markedly slower without it).
onnxruntime's ``session.set_denormal_as_zero`` only sets its pool threads, and with one
intra-op thread every kernel runs on the caller's thread, so the backend sets the caller's
control register around each run and restores it after (the caller's own numpy code keeps
IEEE denormals). The values that flush are below 1.2e-38: probabilities of masked positions.

Through glibc's ``fegetenv`` / ``fesetenv``: on x86-64 the MXCSR word sits after the 28-byte
x87 environment in ``fenv_t`` (FTZ bit 15, DAZ bit 6); on aarch64 ``fenv_t`` is (FPCR, FPSR)
and FPCR bit 24 is FZ. Only the x86-64 path was run here; elsewhere ``flush_denormals`` does
nothing and says so once in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

log = logging.getLogger(__name__)


class _FenvX86(ctypes.Structure):
    _fields_ = [("x87", ctypes.c_uint8 * 28), ("control", ctypes.c_uint32)]  # control: MXCSR


class _FenvArm(ctypes.Structure):
    _fields_ = [("control", ctypes.c_uint32), ("status", ctypes.c_uint32)]  # control: FPCR


# machine -> (fenv_t layout, the control-word bits that flush denormals)
_LAYOUTS: dict[str, tuple[type[ctypes.Structure], int]] = {
    "x86_64": (_FenvX86, (1 << 15) | (1 << 6)),  # FTZ | DAZ
    "aarch64": (_FenvArm, 1 << 24),  # FZ
}


@cache
def _libm() -> tuple[ctypes.CDLL, type[ctypes.Structure], int] | None:
    layout = _LAYOUTS.get(platform.machine())
    name = ctypes.util.find_library("m")
    if layout is None or name is None or platform.system() != "Linux":
        log.info(
            "flush-to-zero not available on %s %s: denormals keep their IEEE cost",
            platform.system(),
            platform.machine(),
        )
        return None
    return ctypes.CDLL(name), *layout


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Denormal inputs and results count as zero on this thread inside the block; the previous mode after."""
    lib = _libm()
    if lib is None:
        yield
        return
    libm, layout, bits = lib
    saved = layout()
    if libm.fegetenv(ctypes.byref(saved)) != 0:
        yield
        return
    flushed = layout()
    ctypes.memmove(ctypes.byref(flushed), ctypes.byref(saved), ctypes.sizeof(layout))
    flushed.control |= bits  # type: ignore[attr-defined]
    libm.fesetenv(ctypes.byref(flushed))
    try:
        yield
    finally:
        libm.fesetenv(ctypes.byref(saved))
