"""``molmo-edge serve BUNDLE``: the bundle on this machine's best backend, for robots elsewhere (openpi protocol).

\b
Examples:
  molmo-edge serve bundle/                                 # loopback only, no key needed
  MOLMO_EDGE_API_KEY=$(cat key) molmo-edge serve bundle/ --host 0.0.0.0 --port 8000
  molmo-edge serve bundle/ --host 0.0.0.0 --api-key-file key --tls-cert cert.pem --tls-key key.pem
"""

from __future__ import annotations

from pathlib import Path

import click

from molmoact2_edge.errors import DependencyError


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, help="TCP port (0: any free port, printed at start).")
@click.option("--backend", default="auto", show_default=True, help="auto | onnxruntime | tensorrt | torch.")
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the API key (default: $MOLMO_EDGE_API_KEY). Required beyond loopback.",
)
@click.option("--no-auth", is_flag=True, help="Listen beyond loopback without an API key (trusted networks only).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="TLS certificate chain (PEM): serve wss://.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="TLS private key (PEM).")
@click.option("--max-clients", default=16, show_default=True, help="Robots connected at once; more get HTTP 503.")
@click.option("--max-queue", default=16, show_default=True, help="Requests waiting at once; more get 'server busy'.")
@click.option(
    "--deadline-ms", default=2000.0, show_default=True, help="Default deadline of a request (a client may send its own)."
)
@click.option("--max-image-side", default=1280, show_default=True, help="Largest camera frame side accepted, pixels.")
def serve(
    bundle: Path,
    host: str,
    port: int,
    backend: str,
    api_key_file: Path | None,
    no_auth: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_clients: int,
    max_queue: int,
    deadline_ms: float,
    max_image_side: int,
) -> None:
    """Serve BUNDLE over a websocket in openpi's policy protocol (openpi_client.WebsocketClientPolicy works as is).

    Health: GET /healthz; metrics (Prometheus text): GET /metrics, on the same port.
    """
    try:
        from molmoact2_edge.serving.server import PolicyServer, ServeConfig
    except ImportError as err:
        raise DependencyError(f"serve needs websockets ({err}): pip install 'molmoact2-edge[serve]'") from err
    from molmoact2_edge.runtimes.session import PolicySession
    from molmoact2_edge.serving import auth
    from molmoact2_edge.serving.contract import policy_contract
    from molmoact2_edge.serving.protocol import RequestLimits

    key = auth.load_api_key(api_key_file)
    auth.check_server_key(host, key, allow_no_key=no_auth)
    config = ServeConfig(
        host=host,
        port=port,
        api_key=key,
        tls=auth.server_tls(tls_cert, tls_key),
        limits=RequestLimits(max_image_side=max_image_side),
        max_clients=max_clients,
        max_queue=max_queue,
        deadline_s=deadline_ms / 1e3,
    )
    with PolicySession(bundle, backend) as session:
        server = PolicyServer(session, policy_contract(session.bundle), config)

        def ready(url: str) -> None:
            http = url.replace("ws", "http", 1)
            click.echo(f"serving {bundle} on {url} (backend {session.backend.name}, key {'required' if key else 'off'})")
            click.echo(f"health {http}/healthz, metrics {http}/metrics")

        server.run(ready)
