"""API keys and TLS for ``serve`` and its clients: keys come from a file or the environment, never argv.

A key on the command line would show in ``ps`` and shell history, so there is no ``--api-key``.
The client sends openpi's header ``Authorization: Api-Key <key>``; the server compares it in
constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
from pathlib import Path

from molmoact2_edge.errors import ServingError

API_KEY_ENV = "MOLMO_EDGE_API_KEY"
SCHEME = "Api-Key"
MIN_KEY_CHARS = 16


def load_api_key(path: Path | None, env: str = API_KEY_ENV) -> str | None:
    """The key from ``path`` (first line, stripped) if given, else from ``$env``, else None."""
    if path is not None:
        try:
            lines = Path(path).read_text().strip().splitlines()
        except OSError as err:
            raise ServingError(f"{path}: cannot read the API key file ({err.strerror})") from err
        if not lines:
            raise ServingError(f"{path}: the API key file is empty")
        return lines[0].strip()
    key = os.environ.get(env, "").strip()
    return key or None


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname that may resolve anywhere


def check_server_key(host: str, key: str | None, allow_no_key: bool) -> None:
    """Refuse to listen beyond loopback without a key (unless explicitly allowed), or with a short key."""
    if key is None and not is_loopback(host) and not allow_no_key:
        raise ServingError(
            f"listening on {host} (beyond loopback) needs an API key: put one in a file and pass "
            f"--api-key-file PATH, or set {API_KEY_ENV} (or pass --no-auth on a trusted network)"
        )
    if key is not None and len(key) < MIN_KEY_CHARS:
        raise ServingError(f"the API key has {len(key)} characters; use at least {MIN_KEY_CHARS} (e.g. `openssl rand -hex 24`)")


def header_value(key: str) -> str:
    return f"{SCHEME} {key}"


def authorized(header: str | None, key: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``key`` (always true when no key is configured)."""
    if key is None:
        return True
    # compare the whole header in constant time: no early exit on a wrong scheme or length
    return hmac.compare_digest((header or "").encode(), header_value(key).encode())


def server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A TLS server context from a certificate chain and its private key, or None for plain ws://."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ServingError("TLS needs both --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ServingError(f"cannot load TLS certificate {cert} / key {key}: {err}") from err
    return context


def client_tls(ca_file: Path | None) -> ssl.SSLContext:
    """A TLS client context verifying the server (against ``ca_file`` for a self-signed server)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as err:
        raise ServingError(f"cannot load the CA file {ca_file}: {err}") from err
