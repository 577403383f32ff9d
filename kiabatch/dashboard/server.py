"""Serve the dashboard with uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import webbrowser
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette

from ..errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8577


def parse_host(host: str) -> str:
    """``host`` as an IP address to bind (``localhost`` is 127.0.0.1); UsageError for anything else."""
    if host == "localhost":
        return DEFAULT_HOST
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        raise UsageError(f"bad --host {host!r:.60}: give an IP address to listen on, e.g. 127.0.0.1 "
                         "(the default), ::1, or 0.0.0.0 for every interface") from None  # fmt: skip


def is_loopback(host: str) -> bool:
    """True if ``host`` (an IP address) only accepts connections from this machine."""
    return ipaddress.ip_address(host).is_loopback


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); UsageError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                         "(0 picks a free one) or --host") from None  # fmt: skip
    return sock


def url_of(sock: socket.socket) -> str:
    """The dashboard's URL for a listening socket."""
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - naming, not binding
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(app: Starlette, sock: socket.socket, *, open_browser: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM (uvicorn shuts down gracefully); both end it normally."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, lifespan="off",
                            timeout_graceful_shutdown=3)  # fmt: skip
    server = uvicorn.Server(config)
    url = url_of(sock)
    if on_ready is not None:
        on_ready(url)
    if open_browser:
        threading.Timer(0.3, webbrowser.open, [url]).start()
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    # make that a KeyboardInterrupt for both, and stopping is how a server ends (exit 0), not an error.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
