"""Test helpers for ``serve``: a server in its own process, and openpi's client in its own venv."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789abcdef"
OPENPI_CLIENT = "openpi-client==0.1.2"
# openpi-client 0.1.2 imports typing_extensions without declaring it
OPENPI_EXTRA = "typing-extensions>=4"
OPENPI_VENV = REPO / ".cache" / "openpi-client-venv"


def env(**extra: str) -> dict[str, str]:
    """This checkout first on the path, the test API key in the environment."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(REPO), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out["MOLMO_EDGE_API_KEY"] = API_KEY
    out.setdefault("MUJOCO_GL", "egl")
    out.update(extra)
    return out


class ServeProcess:
    """``molmo-edge serve BUNDLE`` in a subprocess; ``url`` once it listens. Kill it with ``kill()``."""

    def __init__(self, bundle: Path, port: int = 0, *args: str, timeout_s: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "molmoact2_edge.cli.main", "serve", str(bundle), "--port", str(port)]
        cmd += ["--backend", "onnxruntime", *args]
        self.proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_for_url(timeout_s)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.http = self.url.replace("ws", "http", 1)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_for_url(self, timeout_s: float) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                self.kill()
                raise AssertionError("serve did not start:\n" + "".join(self.output)) from None
            match = re.search(r" on (wss?://\S+) ", line)
            if match:
                return match.group(1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def openpi_python() -> Path:
    """The python of a venv holding openpi-client from PyPI (it needs numpy < 2), built once under .cache/."""
    python = OPENPI_VENV / "bin" / "python"
    probe = [str(python), "-c", "import openpi_client.websocket_client_policy"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(OPENPI_VENV)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", OPENPI_CLIENT, OPENPI_EXTRA],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        text = install.stderr + install.stdout
        if any(s in text for s in ("No matching distribution", "Could not find a version", "connection", "Network")):
            pytest.skip(f"PyPI unreachable, cannot install {OPENPI_CLIENT}: {text.strip().splitlines()[-1]}")
        raise AssertionError(f"installing {OPENPI_CLIENT} failed:\n{text}")
    return python
