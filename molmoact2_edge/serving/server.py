"""``PolicyServer``: one loaded bundle answering many robots over openpi's websocket policy protocol.

Pieces, in the order a request meets them:

- **handshake** (``_process_request``): ``GET /healthz`` and ``GET /metrics`` are answered as plain
  HTTP on the same port; a websocket upgrade without the API key gets ``401`` and nothing else;
  beyond ``max_clients`` connections a new one gets ``503``.
- **connection** (``_handle``): sends the metadata (the policy contract) on connect, then per
  frame: parse and check (``protocol.parse_request``), queue, wait, reply. A bad frame is answered
  with a text frame naming the problem and the connection stays open. Each connection owns a
  ``PolicySession`` over the shared backend, so per-robot state (the depth cache, the chunk
  prefix) is never shared between robots.
- **queue**: at most ``max_queue`` requests wait; a connection has at most one request in flight
  (it reads its next frame only after replying), so arrival order is round-robin across robots
  and a fast sender cannot starve a slow one. A full queue answers "server busy".
- **worker** (``_work``): one inference thread (backends are not thread-safe; the graphs have a
  fixed batch of 1, so concurrent requests are served one after another, not batched). A request
  that waited past its deadline is answered "deadline exceeded" without computing; a chunk that
  finishes past it is discarded the same way, never sent stale. A request whose client vanished
  is skipped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from ssl import SSLContext
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response

from molmoact2_edge.errors import MolmoEdgeError, ServingError
from molmoact2_edge.runtimes.session import PolicySession
from molmoact2_edge.serving import auth
from molmoact2_edge.serving.codec import packb
from molmoact2_edge.serving.protocol import Request, RequestLimits, parse_request, reply
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)

HEALTH_PATH, METRICS_PATH = "/healthz", "/metrics"
LATENCY_WINDOW = 2048  # recent requests kept per client (and in total) for the latency quantiles


class DeadlineExceeded(ServingError):
    """A request's chunk could not be delivered within its deadline."""


class ServerBusy(ServingError):
    """The request queue is full."""


@dataclass(frozen=True)
class ServeConfig:
    """How ``serve`` listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    tls: SSLContext | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_clients: int = 16
    max_queue: int = 16
    deadline_s: float = 2.0  # when a request names none
    warmup: bool = True


class _Latencies:
    """Recent latencies (s) and a count, for quantiles in /metrics."""

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.count = 0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.count += 1

    def quantiles_ms(self) -> dict[str, float]:
        if not self.recent:
            return {}
        p50, p99 = np.percentile(np.asarray(self.recent) * 1e3, [50, 99])
        return {"0.5": float(p50), "0.99": float(p99)}


@dataclass
class _Client:
    """One connected robot: its own session (per-robot state) and counters."""

    id: int
    peer: str
    session: PolicySession
    latency: _Latencies = field(default_factory=_Latencies)
    errors: int = 0

    def act(self, request: Request) -> ActionChunk:
        if request.reset:
            self.session.reset()
        return self.session.act(request.observation, seed=request.seed)


@dataclass
class _Job:
    client: _Client
    request: Request
    received: float
    deadline_s: float
    future: asyncio.Future[tuple[ActionChunk, float]]


class PolicyServer:
    """Serve ``session``'s bundle and backend to many robots. Blocking entry point: ``run()``."""

    def __init__(self, session: PolicySession, contract: dict[str, Any], config: ServeConfig) -> None:
        """session: the loaded bundle (its backend is shared by every connection's own session).
        contract: the policy contract (``contract.policy_contract``), sent with the metadata.
        """
        self.session, self.config = session, config
        self.metadata = {
            **contract,
            "backend": session.backend.describe(),
            "server": {
                "max_image_side": config.limits.max_image_side,
                "max_prompt_chars": config.limits.max_prompt_chars,
                "max_message_bytes": self.max_message_bytes,
                "default_deadline_ms": config.deadline_s * 1e3,
                "batch_size": 1,
            },
        }
        self.clients: dict[int, _Client] = {}
        self.latency = _Latencies()
        self.errors: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._ids = itertools.count(1)
        self._queue: asyncio.Queue[_Job] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker: asyncio.Task[None] | None = None

    @property
    def max_message_bytes(self) -> int:
        return self.config.limits.max_message_bytes(len(self.session.camera_order))

    # --- lifecycle ---------------------------------------------------------------------------

    def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Listen until cancelled (Ctrl-C). ready(url) is called once the port is bound."""
        asyncio.run(self._main(ready))

    async def _main(self, ready: Callable[[str], None] | None) -> None:
        async with await self.start() as server:
            if ready is not None:
                ready(self.url(server))
            try:
                await server.serve_forever()
            finally:
                await self.stop()

    async def start(self) -> Server:
        """Warm the backend up, start the worker and bind; returns the websockets server."""
        loop = asyncio.get_running_loop()
        if self.config.warmup:
            await loop.run_in_executor(self._pool, self._warm_up)
        self._queue = asyncio.Queue(maxsize=self.config.max_queue)
        self._worker = asyncio.create_task(self._work(), name="inference-queue")
        return await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            ssl=self.config.tls,
            max_size=self.max_message_bytes,
            compression=None,  # openpi's client connects without compression; images do not compress anyway
            max_queue=4,
        )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def url(self, server: Server) -> str:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        scheme = "wss" if self.config.tls is not None else "ws"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def _warm_up(self) -> None:
        """One act() on a blank observation, so the first robot does not pay for allocation and kernels."""
        h, w = self.session.image_size
        blank = Observation(
            images={c: np.zeros((h, w, 3), np.uint8) for c in self.session.camera_order},
            state=np.zeros(self.session.state_dim, np.float32),
            task="warm up",
        )
        t0 = time.perf_counter()
        self.session.act(blank, seed=0)
        self.session.reset()
        log.info("warm-up act() took %.0f ms", (time.perf_counter() - t0) * 1e3)

    # --- HTTP on the same port ---------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: HttpRequest) -> Response | None:
        path = request.path.split("?")[0]
        if path == HEALTH_PATH:
            healthy = self._worker is not None and not self._worker.done()
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            return _text(status, "ok\n" if healthy else "inference worker stopped\n")
        authorized = auth.authorized(request.headers.get("Authorization"), self.config.api_key)
        if not authorized:
            self.errors["unauthorized"] += 1
            log.warning("refused %s: missing or wrong API key", _peer(connection))
            return _text(HTTPStatus.UNAUTHORIZED, "error: missing or wrong API key (header 'Authorization: Api-Key <key>')\n")
        if path == METRICS_PATH:
            return _text(HTTPStatus.OK, self.metrics_text())
        if len(self.clients) >= self.config.max_clients:
            self.errors["server_full"] += 1
            return _text(HTTPStatus.SERVICE_UNAVAILABLE, f"error: server full ({self.config.max_clients} robots connected)\n")
        return None  # go on with the websocket handshake

    def metrics_text(self) -> str:
        """Prometheus text format: clients, queue depth, requests, errors by kind, latency quantiles."""
        queue = self._queue.qsize() if self._queue is not None else 0
        lines = [
            "# TYPE molmo_edge_clients gauge",
            f"molmo_edge_clients {len(self.clients)}",
            "# TYPE molmo_edge_queue_depth gauge",
            f"molmo_edge_queue_depth {queue}",
            f"molmo_edge_queue_limit {self.config.max_queue}",
            "# TYPE molmo_edge_requests_total counter",
            f"molmo_edge_requests_total {self.requests}",
            "# TYPE molmo_edge_errors_total counter",
        ]
        lines += [f'molmo_edge_errors_total{{kind="{kind}"}} {n}' for kind, n in sorted(self.errors.items())]
        lines.append("# TYPE molmo_edge_latency_ms summary")
        lines += [f'molmo_edge_latency_ms{{quantile="{q}"}} {v:.3f}' for q, v in self.latency.quantiles_ms().items()]
        lines.append(f"molmo_edge_latency_ms_count {self.latency.count}")
        for client in list(self.clients.values()):
            labels = f'client="{client.id}",peer="{client.peer}"'
            lines.append(f"molmo_edge_client_requests_total{{{labels}}} {client.latency.count}")
            lines.append(f"molmo_edge_client_errors_total{{{labels}}} {client.errors}")
            for q, v in client.latency.quantiles_ms().items():
                lines.append(f'molmo_edge_client_latency_ms{{{labels},quantile="{q}"}} {v:.3f}')
        return "\n".join(lines) + "\n"

    # --- one connection ----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        session = await asyncio.to_thread(PolicySession, self.session.bundle, self.session.backend)
        client = _Client(next(self._ids), _peer(ws), session)
        self.clients[client.id] = client
        log.info("robot %d connected from %s", client.id, client.peer)
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                await self._answer(ws, client, message, closed)
        except ConnectionClosed as err:
            log.info("robot %d: connection closed (%s)", client.id, err)
        finally:
            closed.cancel()
            del self.clients[client.id]
            log.info("robot %d disconnected", client.id)

    async def _answer(self, ws: ServerConnection, client: _Client, message: bytes | str, closed: asyncio.Future[None]) -> None:
        received = time.monotonic()
        self.requests += 1
        try:
            chunk, waited = await self._submit(client, message, received, closed)
        except asyncio.CancelledError:
            if closed.done():  # the client vanished while its request waited or ran
                self.errors["client_gone"] += 1
                log.info("robot %d vanished mid-request; its result is dropped", client.id)
                return
            raise
        except MolmoEdgeError as err:
            await self._refuse(ws, client, err)
            return
        server_s = time.monotonic() - received
        timing = {**chunk.timings, "queue": waited, "server": server_s}
        await ws.send(packb(reply(chunk.actions, timing)))
        client.latency.add(server_s)
        self.latency.add(server_s)

    async def _submit(
        self, client: _Client, message: bytes | str, received: float, closed: asyncio.Future[None]
    ) -> tuple[ActionChunk, float]:
        """Check, queue and await one request; raises MolmoEdgeError for a refusal, CancelledError if the client left."""
        cameras, state_dim = self.session.camera_order, self.session.state_dim
        request = parse_request(message, cameras, state_dim, self.config.limits)
        deadline_s = request.deadline_s if request.deadline_s is not None else self.config.deadline_s
        future: asyncio.Future[tuple[ActionChunk, float]] = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        try:
            self._queue.put_nowait(_Job(client, request, received, deadline_s, future))
        except asyncio.QueueFull:
            raise ServerBusy(f"server busy: {self.config.max_queue} requests queued; retry later") from None
        waiting: set[asyncio.Future[Any]] = {future, closed}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not future.done():
            future.cancel()
            raise asyncio.CancelledError
        chunk, waited = future.result()
        elapsed = time.monotonic() - received
        if elapsed > deadline_s:
            raise DeadlineExceeded(
                f"deadline exceeded: the chunk was ready after {elapsed * 1e3:.0f} ms (deadline {deadline_s * 1e3:.0f} ms, "
                f"{waited * 1e3:.0f} ms queued); discarded rather than sent stale"
            )
        return chunk, waited

    async def _refuse(self, ws: ServerConnection, client: _Client, err: MolmoEdgeError) -> None:
        kind = "deadline" if isinstance(err, DeadlineExceeded) else "busy" if isinstance(err, ServerBusy) else "request"
        self.errors[kind] += 1
        client.errors += 1
        log.info("robot %d: %s", client.id, err)
        await ws.send(f"error: {err}")  # a text frame: openpi's client raises it as the server's error

    # --- the inference worker ----------------------------------------------------------------

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.future.done():  # cancelled: the client left while queued
                continue
            waited = time.monotonic() - job.received
            if waited > job.deadline_s:
                job.future.set_exception(
                    DeadlineExceeded(
                        f"deadline exceeded: the request waited {waited * 1e3:.0f} ms in the queue "
                        f"(deadline {job.deadline_s * 1e3:.0f} ms); no chunk computed"
                    )
                )
                continue
            try:
                chunk = await loop.run_in_executor(self._pool, job.client.act, job.request)
            except MolmoEdgeError as err:
                _settle(job.future, error=err)
            except Exception as err:  # a bug or a backend crash: the robot is told, the server keeps serving
                log.exception("robot %d: act() failed", job.client.id)
                _settle(job.future, error=ServingError(f"inference failed: {type(err).__name__}: {err}"))
            else:
                _settle(job.future, result=(chunk, waited))


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the client left while its request ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _text(status: HTTPStatus, body: str) -> Response:
    headers = Headers([("Content-Type", "text/plain; charset=utf-8"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body.encode())


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"
