"""Dependencies point one way (DESIGN.md §2): cli -> runtimes, export, hardware -> core.

Checked on the source (every import statement, including those inside functions), so a
lazy import that goes the wrong way is caught too.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "molmoact2_edge"

# package (relative to molmoact2_edge) -> subpackages it must never import
FORBIDDEN = {
    "model": ("runtimes", "export", "hardware", "cli", "training"),
    "tokenizers": ("runtimes", "export", "hardware", "cli", "model"),
    "hardware": ("model", "runtimes", "export", "cli", "training", "tokenizers", "sim"),
    "runtimes": ("export", "cli", "training"),
    "export": ("cli", "training"),
    "data": ("runtimes", "export", "cli", "training"),
    "viz": ("export", "cli", "training", "model", "hardware"),
}
# The torch backend is the workstation reference: it runs export's graph modules eagerly, so it
# may import them (lazily, only when that backend is chosen). Nothing else on the device side may.
ALLOWED = {("runtimes/backends/torch.py", "molmoact2_edge.export.graphs")}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upstream(package: str) -> None:
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for name in imported_modules(path):
            parts = name.split(".")
            rel = path.relative_to(PKG).as_posix()
            if (rel, name) in ALLOWED:
                continue
            if parts[0] == "molmoact2_edge" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_core_modules_stay_torch_free() -> None:
    """What the device imports from the core (configs, prompts, norm stats, preprocessing) has no torch."""
    core = ["config.py", "types.py", "errors.py", "normalization.py", "preprocess.py", "depth_cache.py"]
    files = [PKG / name for name in core] + sorted((PKG / "tokenizers").rglob("*.py"))
    offenders = [str(p.relative_to(PKG.parent)) for p in files if "torch" in {m.split(".")[0] for m in imported_modules(p)}]
    assert not offenders, offenders
