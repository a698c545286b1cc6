"""``run --policy ws://`` on the simulated SO-101: an episode through a server, a server lost mid-episode, reconnects."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from websockets.sync.client import connect

from molmoact2_edge.cli.main import cli
from molmoact2_edge.runtimes.telemetry import read_jsonl
from molmoact2_edge.serving.codec import packb
from molmoact2_edge.serving.remote import RemotePolicy
from molmoact2_edge.types import Observation
from tests._runtime_bundle import tiny_bundle
from tests._serving_helpers import API_KEY, ServeProcess, env

pytestmark = pytest.mark.slow
SIM = ["--robot", "sim-so101", "--hz", "10", "--sim-size", "64", "--first-move-limit", "1"]  # the tiny policy is random


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()[2]


@pytest.fixture(scope="module")
def server(bundle):
    with ServeProcess(bundle, 0, "--max-queue", "1") as proc:  # one robot at a time never fills it
        yield proc


def _records(path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(path) if r["type"] == kind] if path.exists() else []


def test_run_policy_completes_an_episode_with_network_and_server_time_apart(server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOLMO_EDGE_API_KEY", API_KEY)
    log = tmp_path / "run.jsonl"
    args = ["run", "--policy", server.url, *SIM, "--duration", "4", "--stall-timeout", "10", "--telemetry", str(log)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "episode 0: duration" in result.output
    chunks = _records(log, "chunk")
    assert len(chunks) >= 1  # the shared test machine may starve the loop; a dedicated one gets ~10
    for chunk in chunks:
        timings = chunk["timings_ms"]
        assert {"network", "server", "queue", "flow", "total"} <= set(timings)
        assert timings["network"] >= 0 and timings["total"] >= timings["server"]
    start = _records(log, "start")[0]
    assert start["backend"]["backend"] == "remote" and start["backend"]["url"] == server.url


def test_a_wrong_key_stops_run_before_the_episode(server) -> None:
    result = CliRunner().invoke(cli, ["run", "--policy", server.url, *SIM], env={"MOLMO_EDGE_API_KEY": "x" * 20})
    assert result.exit_code == 1 and "refused the API key" in result.output, result.output
    assert "episode" not in result.output


def test_a_full_queue_answers_server_busy_and_keeps_the_connections(server) -> None:
    rng = np.random.default_rng(1)
    images = {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("front", "wrist")}
    request = packb({"images": images, "state": np.zeros(6, np.float32), "prompt": "touch the cube"})
    with contextlib.ExitStack() as stack:
        auth = {"Authorization": f"Api-Key {API_KEY}"}
        robots = [stack.enter_context(connect(server.url, additional_headers=auth)) for _ in range(4)]
        for ws in robots:
            ws.recv()
        for ws in robots:  # four at once: one computing, one queued (--max-queue 1), the rest refused
            ws.send(request)
        answers = [ws.recv(timeout=60) for ws in robots]
        assert any(isinstance(a, bytes) for a in answers)
        busy = [a for a in answers if isinstance(a, str)]
        assert busy and all(a.startswith("error: server busy") for a in busy), answers
        for ws in robots:  # one at a time, everyone is served on the same connection
            ws.send(request)
            assert isinstance(ws.recv(timeout=60), bytes)


def test_server_killed_mid_episode_holds_and_stops_within_the_stall_timeout(bundle, tmp_path) -> None:
    stall = 3.0
    log = tmp_path / "run.jsonl"
    with ServeProcess(bundle) as server:
        cmd = [sys.executable, "-m", "molmoact2_edge.cli.main", "run", "--policy", server.url, *SIM]
        cmd += ["--duration", "120", "--stall-timeout", str(stall), "--telemetry", str(log)]
        run = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 180
            while len(_records(log, "chunk")) < 2:
                assert run.poll() is None and time.monotonic() < deadline, "run did not get going"
                time.sleep(0.2)
            killed_at = time.monotonic()
            server.kill()
            _, stderr = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode != 0, stderr
    # whichever fires first ends the episode: the client giving up on the server after the stall
    # timeout, or the loop's own stall timeout when it was already holding for a late chunk
    lost = f"error: lost the policy server at {server.url}"
    assert lost in stderr or "error: no action for" in stderr and "held position and stopped" in stderr, stderr[-2000:]
    summary = _records(log, "summary")[0]
    # telemetry's clock is time.monotonic(), shared by the processes of this machine
    stopped_after = summary["t"] - killed_at
    assert stopped_after <= stall + 2.0, f"stopped {stopped_after:.1f} s after the server died"
    assert summary["loop"]["held"] > 0  # the arm held its position while the connection was gone


def test_remote_policy_reconnects_when_the_server_returns(bundle) -> None:
    rng = np.random.default_rng(0)
    obs = Observation({c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("front", "wrist")}, np.zeros(6, np.float32), "touch the cube")
    with ServeProcess(bundle) as first:
        policy = RemotePolicy(first.url, API_KEY, timeout_s=30.0, reconnect_s=180.0)
        before = policy.act(obs, seed=1).actions
    with ServeProcess(bundle, first.port):  # the same address, a fresh process
        after = policy.act(obs, seed=1).actions
    policy.close()
    assert policy.reconnects == 1
    np.testing.assert_array_equal(after, before)
