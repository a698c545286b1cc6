"""Adaptive depth-code cache (MolmoAct2-Think, reference §4.13): re-predict only the cells whose pixels changed.

Per camera the cache keeps the previous frame's cell vectors (the image resized
to 320 x 320 and cut into a 10 x 10 grid of 32 x 32 patches) and the depth code
chosen for each cell. On a new frame a cell whose cosine similarity to the
previous frame's cell is at least the threshold (0.996) keeps its code: the
decoder is fed that code as a known token (replayed) instead of predicting it.
Changed cells are re-predicted by the decoder as usual.

A new episode's first frame (after ``reset``) re-predicts every cell, but the codes the camera
saw last are kept as its drafts: the scene is usually the same, so the speculative decoder
(``runtimes.depth_decode``) checks them in a few block calls instead of one step per cell, with
the same result.

Torch-free; the pixel arithmetic is ``preprocess.depth_cell_vectors`` / ``cells_changed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from molmoact2_edge.preprocess import cells_changed, depth_cell_vectors

DEFAULT_THRESHOLD = 0.996
DEFAULT_SIZE = 320


@dataclass
class _CameraEntry:
    cells: np.ndarray  # (cells, cell_pixels) float64 vectors of the frame the codes were predicted on
    codes: np.ndarray  # (cells,) int64 depth code per cell


@dataclass
class DepthCache:
    """Per-camera previous frame + depth codes; decides which cells must be re-predicted.

    grid: cells per side (10: 100 depth codes per image).
    """

    grid: int = 10
    size: int = DEFAULT_SIZE
    threshold: float = DEFAULT_THRESHOLD
    enabled: bool = True  # False: every frame re-predicts every cell from scratch (the no-cache baseline)
    _entries: dict[str, _CameraEntry] = field(default_factory=dict)
    _last_codes: dict[str, np.ndarray] = field(default_factory=dict)  # per camera, kept across ``reset``
    # the last update, for telemetry and the rerun display: camera, (cells,) codes, (cells,) re-predicted
    last: tuple[str, np.ndarray, np.ndarray] | None = None

    @property
    def num_cells(self) -> int:
        return self.grid * self.grid

    def plan(self, camera: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(cell vectors of ``image``, previous codes or None, (cells,) bool: cell must be re-predicted).

        Previous codes are replayed where a cell is unchanged and are drafts where it changed. With no previous
        frame for ``camera`` every cell is re-predicted, and the codes it saw last before a ``reset`` (if any) are
        the drafts; with the cache disabled, every cell is re-predicted without drafts.
        """
        cells = depth_cell_vectors(image, self.size, self.grid)
        entry = self._entries.get(camera)
        everything = np.ones(self.num_cells, dtype=bool)
        if not self.enabled:
            return cells, None, everything
        if entry is None:
            last = self._last_codes.get(camera)
            return cells, None if last is None else last.copy(), everything
        return cells, entry.codes, cells_changed(entry.cells, cells, self.threshold)

    def update(self, camera: str, cells: np.ndarray, codes: np.ndarray, changed: np.ndarray) -> None:
        """Remember ``codes`` for this frame.

        Only the re-predicted cells take the new frame's pixels: an unchanged cell keeps the frame its
        code came from, so slow drift accumulates against that frame and eventually triggers a re-prediction.
        """
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (self.num_cells,):
            raise ValueError(f"depth cache for '{camera}': expected {self.num_cells} codes, got {codes.shape}")
        self.last = (camera, codes.copy(), np.asarray(changed, dtype=bool).copy())
        self._last_codes[camera] = codes.copy()
        entry = self._entries.get(camera)
        if entry is None:
            self._entries[camera] = _CameraEntry(cells.copy(), codes.copy())
            return
        entry.cells[changed] = cells[changed]
        entry.codes = codes.copy()

    def codes(self, camera: str) -> np.ndarray | None:
        """The codes of ``camera``'s last frame (None before its first)."""
        entry = self._entries.get(camera)
        return None if entry is None else entry.codes.copy()

    def set_codes(self, camera: str, codes: np.ndarray) -> None:
        """Replace the remembered codes of ``camera`` (the parity gate's adversarial drafts); pixels are kept."""
        entry = self._entries.get(camera)
        if entry is None:
            raise ValueError(f"depth cache for '{camera}': no frame yet, nothing to replace")
        entry.codes = np.asarray(codes, dtype=np.int64).copy()

    def last_info(self) -> dict[str, object]:
        """The last update as chunk info: which camera, the grid side, every code, the re-predicted cells."""
        if self.last is None:
            return {}
        camera, codes, changed = self.last
        return {
            "depth_camera": camera,
            "depth_grid": self.grid,
            "depth_codes": codes.tolist(),
            "depth_repredicted": np.flatnonzero(changed).tolist(),
        }

    def reset(self, camera: str | None = None) -> None:
        """Forget one camera (or all): the next frame re-predicts every cell (its last codes stay, as drafts)."""
        self.last = None
        if camera is None:
            self._entries.clear()
        else:
            self._entries.pop(camera, None)
