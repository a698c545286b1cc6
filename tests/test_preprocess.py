"""Numpy image preprocessing: torch-equivalent resize, patch order, pooling indices, depth-cache cells."""

from __future__ import annotations

import numpy as np
import pytest

from molmoact2_edge.errors import ObservationError
from molmoact2_edge.preprocess import (
    cells_changed,
    depth_cell_vectors,
    patchify,
    resize_bilinear,
    resize_cameras,
)


def test_resize_matches_torch_float_interpolate_within_one_lsb() -> None:
    """Reference A1: our float64 blend vs torch's float32 blend differ by 1 LSB on ~4e-5 of pixels."""
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    ours = resize_bilinear(img, (378, 378))
    chw = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(
        chw, size=(378, 378), mode="bilinear", align_corners=False, antialias=False
    )
    ref = ref.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.int64)
    diff = np.abs(ours.astype(np.int64) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_narrowing_resize_matches_torch_too() -> None:
    """A camera frame wider than the ViT input takes the branch that blends only the output's columns."""
    torch = pytest.importorskip("torch")
    img = np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ours = resize_bilinear(img, (96, 96))
    chw = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(chw, size=(96, 96), mode="bilinear", align_corners=False, antialias=False)
    diff = np.abs(ours.astype(np.int64) - ref.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.int64))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_resize_identity_and_constant() -> None:
    img = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(img, (28, 28)), img)
    flat = np.full((7, 9, 3), 77, dtype=np.uint8)
    assert (resize_bilinear(flat, (20, 30)) == 77).all()


def test_patch_order_and_camera_stack() -> None:
    """Depth cells use the vision tower's patch order: index py*g + px, inside (y, x, c) = (y*patch + x)*3 + c."""
    img = np.arange(28 * 28 * 3).reshape(28, 28, 3)
    patches = patchify(img, 14)
    assert patches.shape == (4, 588)
    assert patches[1, (2 * 14 + 5) * 3 + 1] == img[2, 14 + 5, 1]
    assert patches[2, 0] == img[14, 0, 0]
    crops = resize_cameras([np.zeros((5, 7, 3), np.uint8), np.full((9, 4, 3), 9, np.uint8)], (28, 28))
    assert crops.shape == (2, 28, 28, 3) and crops.dtype == np.uint8 and (crops[1] == 9).all()
    with pytest.raises(ObservationError, match="wrist"):
        resize_cameras([np.zeros((5, 5), np.uint8)], (28, 28), ["wrist"])


def test_depth_cells_changed_only_where_patch_changed() -> None:
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    prev = depth_cell_vectors(frame)
    assert prev.shape == (100, 32 * 32 * 3)
    assert not cells_changed(prev, depth_cell_vectors(frame.copy())).any()
    moved = frame.copy()
    moved[:24, :32] = 255 - moved[:24, :32]  # source rows 0..23, cols 0..31 -> resized cell (0, 0)
    changed = cells_changed(prev, depth_cell_vectors(moved))
    assert changed[0] and changed.sum() <= 2  # bilinear taps may touch the neighbour
    black = np.zeros((1, 12))
    assert not cells_changed(black, black)[0] and cells_changed(black, np.ones((1, 12)))[0]


def test_device_side_modules_do_not_import_torch() -> None:
    """Tokenizers, prompt and preprocessing run on the device, which has no torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import molmoact2_edge.preprocess, molmoact2_edge.tokenizers.openfast\n"
        "import molmoact2_edge.tokenizers.prompt, molmoact2_edge.tokenizers.text\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
