"""``RemotePolicy``: a ``serve``d policy behind the local ``PolicySession`` interface, for ``run --policy ws://``.

``act(observation) -> ActionChunk`` sends one request and waits for its reply, so the control
loop, the safety layer and telemetry are the very ones a local bundle uses. The chunk keeps the
*local* observation timestamp, so the loop skips the actions that went stale in transit exactly
as it does for slow local inference. Timings separate the network from the server:
``network`` = round trip - the server's own time (``server``: receipt to reply, of which
``queue`` waiting and the usual stages computing).

On a lost, refused or silent connection (no reply within ``timeout_s``) the connection is
dropped (a late reply can never be mistaken for the next one's) and re-opened, the request sent
again, until ``reconnect_s`` after the first failure; then ``PolicyConnectionError``. Meanwhile
the control loop holds the arm, and its stall timeout bounds the hold. A server that comes back
with another bundle is refused (``ContractError``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from molmoact2_edge.errors import ContractError, PolicyConnectionError, ServingError
from molmoact2_edge.serving import auth
from molmoact2_edge.serving.codec import packb, unpackb
from molmoact2_edge.serving.contract import PROTOCOL_VERSION
from molmoact2_edge.types import ActionChunk, Observation

log = logging.getLogger(__name__)

# Server refusals worth sending again (the next try may be served); any other refusal is final.
TRANSIENT = ("error: deadline exceeded", "error: server busy")
# Metadata that must not change across a reconnect: another bundle behind the same address.
IDENTITY = ("source_sha256", "cameras", "state_dim", "action_dim", "chunk_length", "precision")


def is_remote(policy: str) -> bool:
    """Whether a ``--policy`` value names a server (ws:// or wss://) rather than a bundle directory."""
    return urlparse(policy).scheme in ("ws", "wss")


class RemotePolicy:
    """``PolicySession``'s ``act``/``reset``/``close`` over a websocket to ``molmo-edge serve``."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 2.0,
        reconnect_s: float = 2.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        """url: ws://host:port or wss://host:port. timeout_s: the longest wait for one reply (also sent
        as the request's deadline). reconnect_s: how long to keep re-trying after a failure.
        Raises PolicyConnectionError when the server cannot be reached now, ServingError on a refused key.
        """
        if not is_remote(url):
            raise ServingError(f"--policy {url!r}: expected ws://HOST:PORT or wss://HOST:PORT")
        self.url, self.timeout_s, self.reconnect_s = url, timeout_s, reconnect_s
        self._headers = {"Authorization": auth.header_value(api_key)} if api_key else None
        self._ssl = auth.client_tls(ca_file) if url.startswith("wss://") else None
        self._ws: ClientConnection | None = None
        self._reset_next = False
        self.reconnects = 0
        self.metadata = self._connect(connect_timeout_s)
        if self.metadata.get("protocol_version") != PROTOCOL_VERSION:
            raise ContractError(
                f"{url}: server speaks protocol {self.metadata.get('protocol_version')!r}, this client "
                f"{PROTOCOL_VERSION}; install the same molmoact2-edge version on both sides"
            )
        self.camera_order: list[str] = list(self.metadata["cameras"])
        self.state_dim = int(self.metadata["state_dim"])
        self.action_dim = int(self.metadata["action_dim"])
        self.chunk_length = int(self.metadata["chunk_length"])

    @property
    def contract(self) -> dict[str, Any]:
        """The policy contract the server sent (checked in pre-flight like a local bundle's)."""
        return self.metadata

    def describe(self) -> dict[str, Any]:
        return {"backend": "remote", "url": self.url, "server": self.metadata.get("backend"), "reconnects": self.reconnects}

    def act(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        observation.validate(self.camera_order, self.state_dim)
        request: dict[str, Any] = {
            "images": {name: np.ascontiguousarray(observation.images[name]) for name in self.camera_order},
            "state": np.asarray(observation.state, dtype=np.float32),
            "prompt": observation.task,
            "deadline_ms": self.timeout_s * 1e3,
        }
        if seed is not None:
            request["seed"] = int(seed)
        if self._reset_next:
            request["reset"] = True
        t0 = time.perf_counter()
        body = self._round_trip(packb(request))
        round_trip = time.perf_counter() - t0
        self._reset_next = False
        actions, timing_ms = self._checked_reply(body)
        timings = {stage: ms / 1e3 for stage, ms in timing_ms.items()}
        timings["network"] = max(0.0, round_trip - timings.get("server", 0.0))
        timings["total"] = round_trip  # what the robot waited; the server's act() total is server_total
        if "total" in timing_ms:
            timings["server_total"] = timing_ms["total"] / 1e3
        return ActionChunk(actions=actions, timestamp=observation.timestamp, timings=timings)

    def reset(self) -> None:
        """Forget per-episode state on the server (sent with the next request)."""
        self._reset_next = True

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the connection ----------------------------------------------------------------------

    def _connect(self, timeout_s: float) -> dict[str, Any]:
        try:
            # entered at once (websockets >= 17.1 warns about a connection used outside `with`); closed in _drop
            ws = connect(
                self.url,
                additional_headers=self._headers,
                ssl=self._ssl,
                compression=None,
                max_size=None,
                open_timeout=timeout_s,
            ).__enter__()
        except InvalidStatus as err:
            status = err.response.status_code
            body = err.response.body.decode(errors="replace").strip()
            if status == 401:
                raise ServingError(f"{self.url} refused the API key ({body}); set MOLMO_EDGE_API_KEY or --api-key-file") from err
            raise PolicyConnectionError(f"{self.url} refused the connection: HTTP {status} {body}") from err
        except (OSError, TimeoutError, WebSocketException) as err:
            raise PolicyConnectionError(f"cannot reach the policy server at {self.url}: {err}") from err
        try:
            first = ws.recv(timeout=timeout_s)
            if isinstance(first, str):  # a server refusing us after the handshake says why in text
                raise ServingError(first)
            metadata = unpackb(first)
        except (TimeoutError, WebSocketException, ServingError) as err:
            ws.close()
            raise PolicyConnectionError(f"{self.url} sent no policy metadata: {err}") from err
        if not isinstance(metadata, dict):
            ws.close()
            raise PolicyConnectionError(f"{self.url}: metadata is not a map; is this a molmo-edge serve?")
        self._ws = ws
        return metadata

    def _reconnect(self) -> None:
        metadata = self._connect(self.reconnect_s)
        changed = [k for k in IDENTITY if metadata.get(k) != self.metadata.get(k)]
        if changed:
            self._drop()
            raise ContractError(f"{self.url} came back serving a different policy ({changed} changed); refusing it")
        self.reconnects += 1
        log.warning("reconnected to the policy server at %s", self.url)

    def _drop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def _round_trip(self, data: bytes) -> bytes:
        """Send one request and return its binary reply, reconnecting and re-sending within ``reconnect_s``."""
        give_up: float | None = None
        while True:
            try:
                if self._ws is None:
                    self._reconnect()
                assert self._ws is not None
                self._ws.send(data)
                reply = self._ws.recv(timeout=self.timeout_s)
                if isinstance(reply, bytes):
                    return reply
                if not reply.startswith(TRANSIENT):
                    raise ServingError(f"the policy server refused the request: {reply}")
                reason = reply
            except (OSError, TimeoutError, WebSocketException, PolicyConnectionError) as err:
                reason = f"{type(err).__name__}: {err}" if str(err) else f"no reply within {self.timeout_s:g} s"
                self._drop()
            now = time.monotonic()
            if give_up is None:
                give_up = now + self.reconnect_s
                log.warning("policy server %s: %s; the arm holds while reconnecting", self.url, reason)
            if now >= give_up:
                raise PolicyConnectionError(
                    f"lost the policy server at {self.url} ({reason}); no answer for {self.reconnect_s:g} s"
                )
            time.sleep(min(0.05, max(0.0, give_up - now)))

    def _checked_reply(self, body: bytes) -> tuple[np.ndarray, dict[str, float]]:
        message = unpackb(body)
        if not isinstance(message, dict) or "actions" not in message:
            raise ServingError(f"{self.url}: reply has no 'actions'")
        actions = message["actions"]
        expected = (self.chunk_length, self.action_dim)
        if not isinstance(actions, np.ndarray) or actions.shape != expected or actions.dtype != np.float32:
            got = f"{actions.shape} {actions.dtype}" if isinstance(actions, np.ndarray) else type(actions).__name__
            raise ServingError(f"{self.url}: expected float32 actions {expected}, got {got}")
        timing = message.get("timing", {})
        if not isinstance(timing, dict):
            raise ServingError(f"{self.url}: reply timing is not a map")
        return actions.copy(), {str(k): float(v) for k, v in timing.items()}
