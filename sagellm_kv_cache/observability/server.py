"""``start_metrics_server``: serve a registry over HTTP for Prometheus to scrape."""

from __future__ import annotations

import threading
from typing import Any

from .._closing import Closing
from ..errors import KVConfigError

__all__ = ["MetricsServer", "start_metrics_server"]


class MetricsServer(Closing):
    """A running metrics endpoint; ``shutdown()`` stops it (also a context manager).

    Attributes:
        server: the ``wsgiref`` server from ``prometheus_client``.
        thread: its daemon serving thread.
        addr / port: where it listens (``port`` is the bound one, also for port 0).
    """

    def __init__(self, server: Any, thread: threading.Thread, addr: str) -> None:
        self.server = server
        self.thread = thread
        self.addr = addr
        self.port: int = server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket and join the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)

    close = shutdown  # what ``with`` calls on the way out

    def __repr__(self) -> str:
        return f"MetricsServer({self.url})"


def start_metrics_server(port: int = 0, addr: str = "127.0.0.1", *, registry: Any) -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Args:
        port: TCP port; 0 picks a free one (read it from ``.port``).
        addr: interface to bind; loopback by default (expose deliberately).
        registry: a ``MetricsCollector`` or a ``prometheus_client`` registry.
            Required: this package never serves the process-global registry.

    Returns:
        a ``MetricsServer``; call ``shutdown()`` (or use ``with``) to stop it.
    """
    from prometheus_client import start_http_server

    registry = getattr(registry, "registry", registry)
    if registry is None or not hasattr(registry, "collect"):
        raise KVConfigError("start_metrics_server needs registry=collector (or collector.registry)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise KVConfigError(f"port must be an int in [0, 65535], got {port!r}")
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr)
