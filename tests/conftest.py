"""Shared test setup: deterministic seeds and headless rendering."""

import os
import random

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
# Test processes keep per-session onnxruntime pools: the shared pool is process-wide and, once created,
# makes onnxruntime refuse the sessions the int8 calibrator builds (test_ort_cpu.py runs the shared pool
# in subprocesses).
os.environ.setdefault("MOLMO_EDGE_ORT_THREAD_POOL", "per-session")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
