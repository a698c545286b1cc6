"""Serving load benchmark on loopback: what ``molmo-edge serve`` adds over a local ``act()``, alone and with 8 robots.

\b
    python benchmarks/serve.py                       # the tiny test bundle (built and cached by the tests)
    python benchmarks/serve.py --bundle BUNDLE --robots 8 --hz 30 --seconds 30

What each number includes (every latency is a client-side round trip, ms):

- ``local act()``: ``PolicySession.act`` in this process, onnxruntime CPU, the server idle.
- ``served, 1 robot``: the same observation through ``RemotePolicy`` to a ``serve`` process on
  127.0.0.1 (msgpack-numpy encode, websocket, queue, act, reply, decode); alternated call by call
  with the local one, so both see the same machine load. ``added`` = served - local percentile.
- ``served, N robots``: N robots (threads here, one connection each), each asking for a chunk
  every ``chunk_length * 0.5 / hz`` seconds as the control loop does (or as soon as its previous
  reply arrives when the server is slower than that), for ``--seconds``. Every robot sends its own
  observation and seed, and every reply is compared with that robot's chunk computed locally:
  ``misrouted`` counts replies equal to another's or to none, ``lost`` requests without an answer.
  The graphs have batch 1, so the server answers one request at a time: throughput is bounded by
  1 / act latency and the queue wait grows with the number of robots.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section  # noqa: E402
from molmoact2_edge.errors import PolicyConnectionError, ServingError  # noqa: E402
from molmoact2_edge.runtimes.session import PolicySession  # noqa: E402
from molmoact2_edge.runtimes.telemetry import percentiles  # noqa: E402
from molmoact2_edge.serving.remote import RemotePolicy  # noqa: E402
from molmoact2_edge.types import Observation  # noqa: E402
from tests._serving_helpers import API_KEY, ServeProcess  # noqa: E402


def robot_observation(session: PolicySession, robot: int) -> Observation:
    """A distinct observation per robot (camera-sized noise images, a random state)."""
    rng = np.random.default_rng(robot)
    h, w = session.image_size
    images = {c: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for c in session.camera_order}
    return Observation(images, rng.normal(0, 20, session.state_dim).astype(np.float32), "pick up the red cube")


def alternated(
    session: PolicySession, remote: RemotePolicy, obs: Observation, iterations: int
) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """(local, served) act latencies in seconds, one of each per iteration after one warm-up each,
    and the served calls' split: network (round trip - server time), server overhead (server - act), the server's act()."""
    local, served = [], []
    split: dict[str, list[float]] = {"network": [], "server overhead": [], "server act()": []}
    for i in range(iterations + 1):
        t0 = time.perf_counter()
        session.act(obs, seed=i)
        t1 = time.perf_counter()
        timings = remote.act(obs, seed=i).timings
        t2 = time.perf_counter()
        if i:
            local.append(t1 - t0)
            served.append(t2 - t1)
            split["network"].append(timings["network"])
            split["server overhead"].append(timings["server"] - timings["server_total"])
            split["server act()"].append(timings["server_total"])
    return local, served, split


@dataclass
class RobotLog:
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    misrouted: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def drive_robot(url: str, robot: int, obs: Observation, expected: dict[int, np.ndarray], period_s: float, stop_at: float, log: RobotLog) -> None:
    """One robot: a request per ``period_s`` (or back to back when slower), replies checked against its own chunk."""
    with RemotePolicy(url, API_KEY, timeout_s=60.0, reconnect_s=0.0) as policy:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            log.sent += 1
            try:
                chunk = policy.act(obs, seed=robot)
            except PolicyConnectionError:  # no answer at all: counted as lost below
                continue
            except ServingError as err:  # told why (deadline, busy): an answer, not a loss
                kind = next((k for k in ("deadline", "busy") if k in str(err)), "other")
                log.refused[kind] = log.refused.get(kind, 0) + 1
                continue
            log.answered += 1
            log.latencies.append(time.monotonic() - t0)
            if not np.array_equal(chunk.actions, expected[robot]):
                log.misrouted += 1
            time.sleep(max(0.0, t0 + period_s - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: the tiny test bundle")
    parser.add_argument("--robots", type=int, default=8)
    parser.add_argument("--hz", type=float, default=30.0, help="each robot's control rate")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the N-robot load phase")
    parser.add_argument("--iterations", type=int, default=20, help="alternated local/served calls")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.bundle is None:
        from tests._runtime_bundle import tiny_bundle

        args.bundle = tiny_bundle()[2]

    with ServeProcess(args.bundle, 0, "--max-queue", str(max(16, args.robots)), "--deadline-ms", "600000") as server:
        with PolicySession(args.bundle, "onnxruntime") as session, RemotePolicy(server.url, API_KEY, timeout_s=60.0) as remote:
            observations = {r: robot_observation(session, r) for r in range(args.robots)}
            expected = {r: session.act(obs, seed=r).actions for r, obs in observations.items()}
            local, served, split = alternated(session, remote, observations[0], args.iterations)
            chunk_length = remote.chunk_length
        period_s = chunk_length * 0.5 / args.hz
        logs = [RobotLog() for _ in range(args.robots)]
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(target=drive_robot, args=(server.url, r, observations[r], expected, period_s, stop_at, logs[r]))
            for r in range(args.robots)
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started

    local_p, served_p = percentiles(local, 1e3), percentiles(served, 1e3)
    load = percentiles([x for log in logs for x in log.latencies], 1e3)
    answered = sum(log.answered for log in logs)
    sent = sum(log.sent for log in logs)
    refused: dict[str, int] = {}
    for log in logs:
        for kind, n in log.refused.items():
            refused[kind] = refused.get(kind, 0) + n
    lost = sent - answered - sum(refused.values())
    misrouted = sum(log.misrouted for log in logs)
    demand = args.robots / period_s

    def added(p: dict[str, float], key: str) -> str:
        return f"{p[key] - local_p[key]:+.1f}"

    rows = [
        ["local act()", local_p["count"], f"{local_p['p50']:.1f}", f"{local_p['p99']:.1f}", "", "", f"{1e3 / local_p['p50']:.1f}", "", ""],
        ["served, 1 robot", served_p["count"], f"{served_p['p50']:.1f}", f"{served_p['p99']:.1f}", added(served_p, "p50"), added(served_p, "p99"), f"{1e3 / served_p['p50']:.1f}", 0, 0],
        [
            f"served, {args.robots} robots at {args.hz:g} Hz",
            answered,
            f"{load['p50']:.1f}",
            f"{load['p99']:.1f}",
            added(load, "p50"),
            added(load, "p99"),
            f"{answered / elapsed:.1f} (asked {demand:.1f})",
            lost,
            misrouted,
        ],
    ]
    headers = ["setting", "replies", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "throughput req/s", "lost", "misrouted"]
    table = markdown_table(headers, rows)
    print(table)
    split_text = ", ".join(f"{k} p50 {percentiles(v, 1e3)['p50']:.1f} ms" for k, v in split.items())
    print(f"served, 1 robot: {split_text}")
    if refused:
        print(f"refused: {refused}")
    body = (
        f"{table}\n\nServed, 1 robot, split by the timings in each reply: {split_text} (network includes "
        "the client's encode/decode; a server act() slower than the local one is the two processes sharing 2 cores).\n\n"
        f"Bundle `{args.bundle.name}`, onnxruntime CPU, server and clients on 127.0.0.1; "
        f"{args.robots} robots each asking every {period_s * 1e3:.0f} ms (chunk {chunk_length}, swap at half, "
        f"{args.hz:g} Hz) for {args.seconds:g} s; every reply compared with that robot's locally computed chunk. "
        f"Refused (told, not lost): {refused or 'none'}. The graphs have batch 1, so requests are served one at a "
        "time: throughput stays at about 1 / act latency and with N robots the queue wait is about N x act "
        "latency; `added` is the difference to the local percentile. Measured on the shared, loaded "
        "development machine: rerun on the GPU box for real figures."
    )
    if not args.no_write:
        write_section("serve", "Serving on loopback (`molmo-edge serve`)", body)


if __name__ == "__main__":
    main()
