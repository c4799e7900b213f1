"""The HTTP layer: a threading HTTP server and the request handler routing to its owner."""

from __future__ import annotations

import json
import socket
import socketserver
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .completions import MODEL_ID, _HttpReply
from .rules import RulesError

if TYPE_CHECKING:
    from .server import ScriptedModelServer


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_port = False  # a second server on a taken port must fail, not share it

    def __init__(self, address: tuple[str, int], owner: ScriptedModelServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "KeelScriptedModel/1.0"
    protocol_version = "HTTP/1.0"
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def _path(self) -> str:
        path = urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, reply: _HttpReply | None) -> None:
        if reply is None:  # server stopping: drop the connection without an answer
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Connection", "close")
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired)
        self.close_connection = True

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self._path()
        if path in ("/v1/models", "/models"):
            self._send(_HttpReply.json(200, {"object": "list", "data": [_model_card()]}))
        elif path in (f"/v1/models/{MODEL_ID}", f"/models/{MODEL_ID}"):
            self._send(_HttpReply.json(200, _model_card()))
        elif path == "/admin/stats":
            self._send(_HttpReply.json(200, owner.stats()))
        elif path == "/admin/requests":
            self._send(_HttpReply.json(200, owner.requests()))
        elif path == "/admin/faults":
            self._send(_HttpReply.json(200, owner.faults()))
        elif path in ("/", "/health", "/healthz"):
            self._send(_HttpReply.json(200, {"status": "ok", "url": owner.url}))
        else:
            self._send(_not_found(self.command, path))

    def do_POST(self) -> None:
        owner = self.server.owner
        path = self._path()
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            self._send(_HttpReply.error(400, "Invalid request: unreadable request body"))
            return
        if path in ("/v1/chat/completions", "/chat/completions"):
            self._send(owner._chat(raw))
        elif path == "/admin/faults":
            try:
                data = json.loads(raw or b"[]")
                if isinstance(data, Mapping):
                    data = data.get("faults", [])
                if not isinstance(data, list):
                    raise RulesError("expected a JSON list of fault specs")
                owner.set_faults(data)
            except (ValueError, RulesError) as e:
                self._send(_HttpReply.error(400, f"Invalid request: {e}"))
                return
            self._send(_HttpReply.json(200, {"ok": True, "faults": len(data)}))
        elif path == "/admin/reset":
            owner.reset()
            self._send(_HttpReply.json(200, {"ok": True}))
        else:
            self._send(_not_found(self.command, path))

    def _method_not_allowed(self) -> None:
        self._send(
            _HttpReply.error(405, f"Method {self.command} not allowed", "invalid_request_error")
        )

    do_PUT = _method_not_allowed
    do_DELETE = _method_not_allowed
    do_PATCH = _method_not_allowed


def _model_card() -> dict[str, Any]:
    return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "keel"}


def _not_found(method: str, path: str) -> _HttpReply:
    return _HttpReply.error(
        404, f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
    )
