"""The runtime's commands through the real CLI group: doctor (and run/bench once a bundle exists)."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from molmoact2_edge.cli.main import cli


def test_doctor_reports_backends_power_and_what_is_missing() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["inference"]["backends"]["onnxruntime"] is None
    assert "pip install" in report["inference"]["backends"]["tensorrt"]
    assert report["power"]["sampler"] == "unavailable" and "ina3221" in report["power"]["reason"]
    assert report["features"]["GPU inference (TensorRT)"]
    text = CliRunner().invoke(cli, ["doctor"])
    assert text.exit_code == 0 and "features:" in text.output and "onnxruntime" in text.output


def test_device_side_imports_without_torch() -> None:
    """runtimes, hardware and cli load (and doctor runs) with torch made unimportable, as on a JetPack without torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import importlib, pkgutil\n"
        "import molmoact2_edge.runtimes, molmoact2_edge.hardware, molmoact2_edge.cli\n"
        "for pkg in (molmoact2_edge.runtimes, molmoact2_edge.hardware, molmoact2_edge.cli):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.endswith(('backends.torch', 'backends.tensorrt')):\n"
        "            continue\n"
        "        importlib.import_module(m.name)\n"
        "from molmoact2_edge.cli.main import main\n"
        "main(['doctor'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in proc.stdout  # the torch backend is listed as unavailable, not crashing the report
