"""``molmo-edge doctor``: what this machine has for each feature, and what to install for what it lacks.

\b
Examples:
  molmo-edge doctor
  molmo-edge doctor --json > machine.json
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import platform
from pathlib import Path
from typing import Any

import click

from molmoact2_edge.install_checks import install_steps


def _version(module: str) -> str | None:
    """The installed version of ``module``, or None when it is not importable (imports nothing heavy)."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    from importlib import metadata

    dist = {"cuda.bindings": "cuda-bindings", "cv2": "opencv-python", "pynvml": "nvidia-ml-py"}.get(
        module, module
    )
    for name in (dist, dist.replace("_", "-"), f"{dist}-gpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "installed"


def inference() -> dict[str, Any]:
    """Backends (and why each is unavailable), onnxruntime providers, CUDA/TensorRT/JetPack versions."""
    from molmoact2_edge.runtimes.backends.base import available_backends
    from molmoact2_edge.runtimes.backends.tensorrt import gpu_count
    from molmoact2_edge.runtimes.bundle import jetpack_version

    info: dict[str, Any] = {"backends": available_backends()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        info["onnxruntime"] = None
    count, why = gpu_count()
    info["cuda"] = {"devices": count, "reason": why}
    if count:
        from cuda.bindings import runtime as cudart

        info["cuda"]["driver"] = cudart.cudaDriverGetVersion()[1]
        info["cuda"]["runtime"] = cudart.cudaRuntimeGetVersion()[1]
    info["tensorrt"] = _version("tensorrt")
    info["jetpack_l4t"] = jetpack_version()
    return info


def power() -> dict[str, Any]:
    from molmoact2_edge.runtimes.power import detect_power_sampler

    sampler = detect_power_sampler()
    try:
        return sampler.describe()
    finally:
        sampler.close()


def serial_ports() -> list[dict[str, str]]:
    try:
        from serial.tools import list_ports
    except ImportError:
        return []
    return [
        {"device": p.device, "description": p.description or "", "hwid": p.hwid or ""}
        for p in list_ports.comports()
    ]


def can_channels(sys_net: str = "/sys/class/net") -> list[str]:
    """Network interfaces of link type CAN (ARPHRD_CAN = 280): can0, slcan0, vcan0 ..."""
    channels = []
    for iface in sorted(Path(sys_net).glob("*")):
        try:
            if (iface / "type").read_text().strip() == "280":
                channels.append(iface.name)
        except OSError:
            continue
    return channels


def cameras() -> list[str]:
    return sorted(str(p) for p in Path("/dev").glob("video*"))


def features(report: dict[str, Any]) -> dict[str, str | None]:
    """Feature -> None when usable here, else what is missing and how to get it."""
    backends = report["inference"]["backends"]
    need = {
        "export": [m for m in ("torch", "onnx", "onnxscript") if _version(m) is None],
        "simulation / demo": [m for m in ("mujoco",) if _version(m) is None],
        "plots": [m for m in ("matplotlib",) if _version(m) is None],
    }
    extras = {"export": "export", "simulation / demo": "sim", "plots": "plots"}
    out: dict[str, str | None] = {
        name: (f"missing {mods}: pip install 'molmoact2-edge[{extras[name]}]'" if mods else None)
        for name, mods in need.items()
    }
    out["onnxruntime inference"] = backends.get("onnxruntime")
    out["GPU inference (TensorRT)"] = backends.get("tensorrt")
    out["torch reference backend"] = backends.get("torch")
    out["power measurement"] = (
        report["power"].get("reason") if report["power"]["sampler"] == "unavailable" else None
    )
    usb = [p for p in report["serial_ports"] if p["hwid"] not in ("", "n/a")]  # ttyS* legacy UARTs say n/a
    out["SO-101 (Feetech serial)"] = (
        None if usb else "no USB serial port found (plug in the arm's bus adapter)"
    )
    out["YAM (Damiao CAN)"] = (
        None
        if report["can_channels"]
        else "no CAN interface (sudo ip link set can0 up type can bitrate 1000000)"
    )
    out["cameras"] = None if report["cameras"] else "no /dev/video* device"
    return out


def gather() -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "arch": platform.machine(),
            "system": platform.system(),
        },
        "inference": inference(),
        "power": power(),
        "serial_ports": serial_ports(),
        "can_channels": can_channels(),
        "cameras": cameras(),
    }
    report["features"] = features(report)
    report["install"] = [dataclasses.asdict(s) for s in install_steps(l4t=report["inference"]["jetpack_l4t"])]
    return report


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Show what this machine has (backends, providers, CUDA/TensorRT, power sensors, ports, cameras).

    \b
    Examples:
      molmo-edge doctor
      molmo-edge doctor --json
    """
    report = gather()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    m, inf = report["machine"], report["inference"]
    click.echo(f"machine: {m['arch']} {m['system']}, Python {m['python']}")
    ort_info = inf["onnxruntime"]
    click.echo(
        f"onnxruntime: {ort_info['version']} providers {ort_info['providers']}"
        if ort_info
        else "onnxruntime: -"
    )
    click.echo(
        f"CUDA devices: {inf['cuda']['devices']}"
        + (f" ({inf['cuda']['reason']})" if inf["cuda"]["reason"] else "")
    )
    click.echo(f"TensorRT: {inf['tensorrt'] or '-'}   JetPack L4T: {inf['jetpack_l4t'] or '-'}")
    click.echo("backends:")
    for name, why in inf["backends"].items():
        click.echo(f"  {name:12s} {'ok' if why is None else 'unavailable: ' + why}")
    click.echo(f"power: {report['power']}")
    ports = ", ".join(p["device"] for p in report["serial_ports"]) or "-"
    click.echo(f"serial ports: {ports}   CAN: {', '.join(report['can_channels']) or '-'}")
    click.echo(f"cameras: {', '.join(report['cameras']) or '-'}")
    click.echo("features:")
    for name, why in report["features"].items():
        click.echo(f"  {name:26s} {'ok' if why is None else why}")
    click.echo("install (docs/jetson.md):")
    for step in report["install"]:
        click.echo(f"  {step['name']:36s} {'ok' if step['ok'] else 'NO'}: {step['detail']}")
        if not step["ok"]:
            click.echo(f"      fix: {step['fix']}")
