"""``molmo-edge serve`` on the tiny bundle: openpi's own client, keys, bad requests, vanishing clients.

One server process for the module (started through the real CLI); openpi-client runs from its own
venv (it needs numpy < 2), built once under .cache/ (see tests/_serving_helpers.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from molmoact2_edge.errors import PolicyConnectionError, ServingError
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.serving.codec import packb, unpackb
from molmoact2_edge.serving.remote import RemotePolicy
from molmoact2_edge.types import Observation
from tests._runtime_bundle import tiny_bundle
from tests._serving_helpers import API_KEY, REPO, ServeProcess, env, openpi_python

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Api-Key {API_KEY}"}


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()[2]


@pytest.fixture(scope="module")
def server(bundle):
    with ServeProcess(bundle) as proc:
        yield proc


def _observation(seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for c in ("front", "wrist")}
    state = rng.normal(0, 20, 6).astype(np.float32)
    return Observation(images=images, state=state, task="pick up the red cube")


def _request(obs: Observation, **extra: object) -> bytes:
    return packb({"images": obs.images, "state": obs.state, "prompt": obs.task, **extra})


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_openpi_client_gets_the_local_chunk_for_the_same_observation_and_seed(server, bundle, tmp_path) -> None:
    python = openpi_python()
    obs = _observation(1)
    np.savez(
        tmp_path / "obs.npz",
        image_front=obs.images["front"],
        image_wrist=obs.images["wrist"],
        state=obs.state,
        prompt=np.array(obs.task),
        seed=np.array(7),
    )
    args = [str(python), str(REPO / "tests" / "_openpi_client_script.py"), server.url, API_KEY, "wrong-key-0000000000"]
    proc = subprocess.run([*args, str(tmp_path / "obs.npz"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    served = np.load(tmp_path / "actions.npy")

    with PolicySession(bundle, "onnxruntime") as local:
        expected = local.act(obs, seed=7).actions
    assert served.dtype == np.float32 and served.shape == expected.shape
    np.testing.assert_array_equal(served, expected)  # same graphs, same backend, same noise: bit-identical
    # our codec writes what openpi's writes, byte for byte
    assert (tmp_path / "request.bin").read_bytes() == packb(
        {"images": obs.images, "state": obs.state, "prompt": obs.task, "seed": 7}
    )
    meta = result["metadata"]
    for key in ("cameras", "image_size", "state_dim", "chunk_length", "control_hz", "precision", "backend"):
        assert key in meta, key
    assert meta["cameras"] == ["front", "wrist"] and meta["state_dim"] == 6 and meta["chunk_length"] == len(expected)
    assert meta["precision"] == "fp32" and meta["backend"]["backend"] == "onnxruntime"
    assert {"vision", "prefill", "flow", "queue", "server"} <= set(result["timing"])
    assert "missing ['front', 'wrist']" in result["bad_request"]
    assert result["second_equal"]
    assert "401" in result["wrong_key"]


def test_wrong_or_missing_key_gets_nothing_but_an_error(server) -> None:
    for key in ("not-the-key-at-all-0000", None):
        with pytest.raises(ServingError, match="refused the API key"):
            RemotePolicy(server.url, key)
    assert _http(server.http + "/healthz") == (200, "ok\n")  # supervisors need no key
    status, body = _http(server.http + "/metrics")
    assert status == 401 and "API key" in body
    status, body = _http(server.http + "/metrics", AUTH)
    assert status == 200 and 'molmo_edge_errors_total{kind="unauthorized"}' in body and "molmo_edge_queue_depth" in body


def test_malformed_and_oversized_requests_are_answered_and_others_keep_being_served(server) -> None:
    obs = _observation(2)
    with connect(server.url, additional_headers=AUTH, max_size=None) as ws, RemotePolicy(server.url, API_KEY) as other:
        meta = unpackb(ws.recv())
        for bad, why in [
            (b"\xc1garbage", "not a msgpack-numpy message"),
            (packb({"images": {"front": obs.images["front"]}, "state": obs.state, "prompt": "x"}), "missing ['wrist']"),
            (_request(obs, seed=-5), "seed"),
            (packb({"__ndarray__": 1}), "request keys"),
            ("a text frame", "binary msgpack"),
            (_request(Observation({c: np.zeros((1281, 64, 3), np.uint8) for c in obs.images}, obs.state, obs.task)), "outside 1..1280"),
        ]:
            ws.send(bad)
            answer = ws.recv(timeout=60)
            assert isinstance(answer, str) and answer.startswith("error:") and why in answer, answer
            assert other.act(obs).actions.shape == (meta["chunk_length"], meta["action_dim"])
        ws.send(_request(obs, seed=1))
        good = unpackb(ws.recv(timeout=60))
        assert good["actions"].shape == (meta["chunk_length"], meta["action_dim"])
        # a frame past the byte limit is cut off by the websocket layer (1009) before it is buffered whole
        ws.send(b"\0" * (meta["server"]["max_message_bytes"] + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert other.act(obs).actions.shape == good["actions"].shape
    status, body = _http(server.http + "/metrics", AUTH)
    assert 'molmo_edge_errors_total{kind="request"}' in body


CLIENT = """
import sys, time
from websockets.sync.client import connect
sys.path.insert(0, {repo!r})
from tests.test_serving import _observation, _request
ws = connect({url!r}, additional_headers={{"Authorization": "Api-Key {key}"}}, max_size=None)
ws.recv()
ws.send(_request(_observation(3)))
print("sent", flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_request_does_not_disturb_the_others(server) -> None:
    obs = _observation(4)
    with RemotePolicy(server.url, API_KEY) as other:
        before = other.act(obs, seed=0).actions
        for _ in range(2):
            code = CLIENT.format(repo=str(REPO), url=server.url, key=API_KEY)
            victim = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, text=True)
            assert victim.stdout is not None and victim.stdout.readline().strip() == "sent"
            time.sleep(0.05)  # its request is queued or running now
            victim.kill()
            victim.wait(timeout=30)
            after = other.act(obs, seed=0).actions
            np.testing.assert_array_equal(after, before)  # served, and the answer is this robot's own
    assert _http(server.http + "/healthz")[0] == 200


def test_tls_serves_wss_to_clients_that_trust_the_certificate(bundle, tmp_path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    with ServeProcess(bundle, 0, "--tls-cert", str(cert), "--tls-key", str(key)) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        with RemotePolicy(server.url, API_KEY, ca_file=cert) as policy:
            assert policy.act(_observation(5), seed=0).actions.shape == (policy.chunk_length, policy.action_dim)
        with pytest.raises(PolicyConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            RemotePolicy(server.url, API_KEY)  # a client that does not trust it gets nothing


def test_a_request_past_its_deadline_is_told_so_instead_of_getting_a_stale_chunk(server) -> None:
    obs = _observation(6)
    with connect(server.url, additional_headers=AUTH) as slow, connect(server.url, additional_headers=AUTH) as late:
        slow.recv(), late.recv()
        late.send(_request(obs, deadline_ms=1))  # no act() finishes within 1 ms
        answer = late.recv(timeout=60)
        # computed and discarded as stale, or (a busy machine) expired before the worker took it: never a chunk
        assert isinstance(answer, str) and answer.startswith("error: deadline exceeded"), answer
        assert "stale" in answer or "in the queue" in answer, answer
        slow.send(_request(obs))  # occupies the worker ...
        time.sleep(0.02)
        late.send(_request(obs, deadline_ms=5))  # ... so this one expires in the queue
        assert isinstance(slow.recv(timeout=60), bytes)
        answer = late.recv(timeout=60)
        # here (act() takes ~100 ms) it expired while queued; on a fast GPU it may be computed and discarded
        assert isinstance(answer, str) and answer.startswith("error: deadline exceeded"), answer
        late.send(_request(obs))  # and the connection goes on
        assert isinstance(late.recv(timeout=60), bytes)
