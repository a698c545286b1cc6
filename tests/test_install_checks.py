"""`molmo-edge doctor`'s install steps: each failure comes with the exact fix for this JetPack."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from molmoact2_edge.cli.main import cli
from molmoact2_edge.install_checks import install_steps, jetpack_major, sees_system_site_packages

ALL = {"onnxruntime": True, "tensorrt": True, "cuda.bindings": True}


def _by_name(steps):  # type: ignore[no-untyped-def]
    return {s.name: s for s in steps}


def test_jetpack_major_from_l4t() -> None:
    assert [jetpack_major(v) for v in ("R36.4.3", "R38.2", "R39.0", None, "R35.1")] == [6, 7, 7, None, None]


def test_two_onnxruntime_distributions_are_a_conflict_with_the_jetson_fix() -> None:
    steps = _by_name(install_steps(l4t="R36.4.3", ort_dists=["onnxruntime", "onnxruntime-gpu"], ort_providers=["CPUExecutionProvider"], importable=ALL, system_site=True))
    conflict = steps["one onnxruntime distribution"]
    assert not conflict.ok and conflict.fix is not None
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in conflict.fix and "jp6/cu126" in conflict.fix


def test_jetson_without_system_site_packages_tensorrt_or_cuda_python() -> None:
    importable = {"onnxruntime": True, "tensorrt": False, "cuda.bindings": False}
    steps = _by_name(install_steps(l4t="R38.2", ort_dists=["onnxruntime-gpu"], ort_providers=["CPUExecutionProvider"], importable=importable, system_site=False))
    assert "--system-site-packages" in (steps["venv sees JetPack's system packages"].fix or "")
    assert not steps["onnxruntime has CUDA"].ok and "sbsa/cu130" in (steps["onnxruntime has CUDA"].fix or "")
    assert "python3-libnvinfer" in (steps["tensorrt"].fix or "")
    assert steps["cuda-python"].fix == "pip install 'cuda-python>=13,<14'"


def test_a_good_jetpack_6_install_passes_every_step() -> None:
    steps = install_steps(l4t="R36.4.3", ort_dists=["onnxruntime-gpu"], ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"], importable=ALL, system_site=True)
    assert all(s.ok for s in steps), steps


def test_venv_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    assert sees_system_site_packages(str(tmp_path), "/usr")
    (tmp_path / "pyvenv.cfg").write_text("include-system-site-packages = false\n")
    assert not sees_system_site_packages(str(tmp_path), "/usr")


def test_doctor_prints_the_install_steps() -> None:
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0 and "install (docs/jetson.md):" in result.output
    assert "onnxruntime" in result.output and "fix: " in result.output  # no TensorRT here: its fix is printed
