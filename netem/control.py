"""A control endpoint for a running proxy: a small HTTP/JSON API on loopback.

Toxiproxy-style: a test harness (or ``rmsg netem ctl``) changes a running
:class:`~netem.proxy.UdpProxy`'s faults without restarting it. It is off by
default; ``UdpProxy(control="127.0.0.1:0")`` or ``rmsg netem --control
127.0.0.1:PORT`` turns it on. One standard-library ``http.server`` thread
serves it; every request becomes one call of the proxy's Python API, so the
rules and their precedence are the same.

Requests (all answers are JSON; errors are ``{"error": "..."}`` with status
400, 404 or 403):

* ``GET /faults`` — the rules in force (``UdpProxy.faults_in_force``);
* ``GET /stats`` — the proxy's counters, with each active client's own;
* ``POST /set`` — body ``{"spec": "loss 10%", "direction": "up", "client": "127.0.0.1:5000"}``
  (or ``"up"``/``"down"`` specs each on its own); ``direction`` and ``client`` optional;
* ``POST /clear`` — body ``{}`` or ``{"client": ...}``;
* ``POST /partition`` and ``POST /heal`` — body ``{"direction": ..., "client": ...}``.

Security. There is **no authentication**: anyone who can reach the port can
change the faults. It therefore binds to loopback only (a non-loopback address
is refused) and must stay there. To keep web pages in a local browser out,
POSTs must carry ``Content-Type: application/json`` (a cross-site page cannot
send that without a CORS preflight, which is never granted) and the ``Host``
header must name a loopback address (which defeats DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .proxy import UdpProxy

__all__ = ["ControlServer", "is_loopback"]

_MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address literal or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


class _Server(HTTPServer):
    proxy: UdpProxy


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the proxy's own output is the counters

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host.startswith("[") and "]" in host:
            name = host[1 : host.index("]")]
        if not is_loopback(name):
            self._reply(403, {"error": "Host must be a loopback address"})
            return False
        return True

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        proxy = self.server.proxy
        if self.path == "/faults":
            self._reply(200, proxy.faults_in_force())
        elif self.path == "/stats":
            stats = proxy.snapshot().as_dict()
            stats["per_client"] = {
                client: {name: c.as_dict() for name, c in links.items()}
                for client, links in proxy.client_counters().items()
            }
            self._reply(200, stats)
        else:
            self._reply(404, {"error": f"no such resource {self.path}: try /faults or /stats"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.headers.get_content_type() != "application/json":
            self._reply(403, {"error": "send Content-Type: application/json"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._reply(400, {"error": "request body too large"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            self._command(body)
        except ValueError as exc:  # bad JSON, spec, direction or client
            self._reply(400, {"error": str(exc)})
            return
        self._reply(200, self.server.proxy.faults_in_force())

    def _command(self, body: dict[str, Any]) -> None:
        proxy = self.server.proxy
        client = body.get("client")
        direction = body.get("direction", "both")
        for name, value in (("client", client), ("direction", direction)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
        action = self.path.strip("/")
        if action == "set":
            specs = {k: body.get(k) for k in ("spec", "up", "down")}
            if any(v is not None and not isinstance(v, str) for v in specs.values()):
                raise ValueError("spec, up and down must be netem spec strings")
            proxy.set(
                specs["spec"],
                up=specs["up"],
                down=specs["down"],
                direction=direction,
                client=client,
            )
        elif action == "clear":
            proxy.clear(client=client)
        elif action == "partition":
            proxy.partition(direction, client=client)
        elif action == "heal":
            proxy.heal(direction, client=client)
        else:
            raise ValueError(f"no such command {self.path}: use /set, /clear, /partition, /heal")


class ControlServer:
    """Serves a proxy's control API on a loopback address, in a daemon thread."""

    def __init__(self, proxy: UdpProxy, address: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        host, port = address
        if not is_loopback(host):
            raise ValueError(
                f"the control endpoint has no authentication, so it only listens on "
                f"loopback (127.0.0.1 or ::1), not {host!r}"
            )
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.proxy = proxy
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> ControlServer:
        """Serve the control API on a background thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="netem-control",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and join the thread. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(2)
        self._server.server_close()
