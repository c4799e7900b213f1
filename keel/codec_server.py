"""The codec server: Temporal's remote codec protocol over HTTP, so that the Web UI and the
`temporal` CLI (`--codec-endpoint`) show a trusted operator the decrypted payloads.

    POST <prefix>/decode   {"payloads": [...]} -> the same payloads, decrypted
    POST <prefix>/encode   {"payloads": [...]} -> the same payloads, encrypted
    OPTIONS                CORS preflight, for the Web UI's origins only
    GET  /                 a sign-in page; POST /login sets the session cookie the Web UI
                           sends when "Include cross-origin credentials" is on

Every /encode and /decode needs `Authorization: Bearer <KEEL_CODEC_AUTH_TOKEN>` (what
`temporal --codec-auth 'Bearer ...'` sends) or the session cookie; both are checked in
constant time. A request from a browser origin not listed is refused, whatever it carries.
The server only holds the keys: it talks to no Temporal server and keeps nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import html
import json
import logging
import signal
import socket
import socketserver
import threading
from collections.abc import Sequence
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from keel.codec import EncryptionCodec, PayloadDecryptError, new_token
from keel.config import DEFAULT_CODEC_PORT, Settings, SettingsError

log = logging.getLogger("keel.codec")

SESSION_COOKIE = "keel_codec_session"
SESSION_SECONDS = 12 * 3600
MAX_BODY_BYTES = 64 * 1024 * 1024  # a page of history: many payloads of up to 2 MB each
MIN_TOKEN_CHARS = 16
ALLOWED_HEADERS = "Authorization, Authorization-Extras, Content-Type, X-Namespace"


class CodecServerError(OSError):
    """The codec server cannot start; the message says why."""


class CodecServer:
    """The codec server on a background thread.

    >>> with CodecServer(EncryptionCodec(keys), token, port=0) as server:
    ...     print(server.url)  # temporal workflow show --codec-endpoint URL ...
    """

    def __init__(
        self,
        codec: EncryptionCodec,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_CODEC_PORT,
        cors_origins: Sequence[str] = ("http://localhost:8233",),
        secure_cookie: bool = False,
    ) -> None:
        if len(token) < MIN_TOKEN_CHARS:
            raise SettingsError(
                f"the codec server's token is {len(token)} characters; use at least "
                f"{MIN_TOKEN_CHARS} (make one with `keel keygen --token`)"
            )
        self.codec = codec
        self.host = host
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.secure_cookie = secure_cookie
        self._token = token.encode()
        # the cookie holds a MAC of the token, not the token: it works only here
        self._session = hmac.new(self._token, b"keel-codec-session/1", hashlib.sha256).hexdigest()
        self._requested_port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> None:
        """Bind and serve in a daemon thread."""
        try:
            self._httpd = _Server((self.host, self._requested_port), self)
        except OSError as e:
            taken = e.errno == errno.EADDRINUSE
            raise CodecServerError(
                f"cannot start the codec server on {self.host}:{self._requested_port}: "
                + ("the port is taken (set KEEL_CODEC_PORT)" if taken else str(e.strerror or e))
            ) from e
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"keel-codec-server:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> CodecServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ---- what the handler asks

    def authorized(self, authorization: str | None, cookie: str | None) -> bool:
        """A bearer token or a session cookie, compared in constant time."""
        ok = False
        if authorization:
            scheme, _, presented = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                ok = hmac.compare_digest(presented.strip().encode(), self._token)
        session = _cookie(cookie, SESSION_COOKIE)
        if session is not None:
            ok = hmac.compare_digest(session.encode(), self._session.encode()) or ok
        return ok

    def session_cookie(self, clear: bool = False) -> str:
        value, age = ("", 0) if clear else (self._session, SESSION_SECONDS)
        secure = "; Secure" if self.secure_cookie else ""
        return f"{SESSION_COOKIE}={value}; Max-Age={age}; Path=/; HttpOnly; SameSite=Strict{secure}"

    def check_token(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self._token)

    def transform(self, operation: str, body: bytes) -> bytes:
        """Decode or encode a `{"payloads": [...]}` body."""
        payloads = json_format.Parse(body, Payloads(), ignore_unknown_fields=True)
        if operation == "decode":
            out = self.codec.decrypt(payloads.payloads)
        else:
            out = self.codec.encrypt(payloads.payloads)
        return json.dumps({"payloads": [json_format.MessageToDict(p) for p in out]}).encode()


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    try:
        jar = SimpleCookie(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_port = False

    def __init__(self, address: tuple[str, int], owner: CodecServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # without HTTPServer's reverse DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "KeelCodec/1.0"
    protocol_version = "HTTP/1.0"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    @property
    def owner(self) -> CodecServer:
        return self.server.owner

    def _route(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _origin(self) -> str | None:
        return self.headers.get("Origin")

    def _cors(self) -> dict[str, str]:
        origin = self._origin()
        if origin and origin.rstrip("/") in self.owner.cors_origins:
            return {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin",
            }
        return {"Vary": "Origin"}

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        for k, v in {
            **self._cors(),
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Connection": "close",
            **(headers or {}),
        }.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), headers=headers)

    def _body(self, limit: int) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > limit:
            self._error(413, f"the body must be at most {limit} bytes, with a Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def do_OPTIONS(self) -> None:
        if not self._cors().get("Access-Control-Allow-Origin"):
            self._error(403, "origin not allowed: add it to KEEL_CODEC_CORS_ORIGINS")
            return
        self._reply(
            204,
            headers={
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    def do_POST(self) -> None:
        route = self._route()
        if route == "/login" or route == "/logout":
            self._sign_in(route == "/login")
            return
        operation = route.rsplit("/", 1)[-1]
        if operation not in ("decode", "encode"):
            self._error(404, f"no {route} here: POST .../decode or .../encode")
            return
        origin = self._origin()
        if origin and "Access-Control-Allow-Origin" not in self._cors():
            self._error(403, f"origin {origin} is not allowed: add it to KEEL_CODEC_CORS_ORIGINS")
            return
        if not self.owner.authorized(self.headers.get("Authorization"), self.headers.get("Cookie")):
            log.info("refused %s from %s: no valid token", route, self.address_string())
            self._error(
                401,
                "a valid `Authorization: Bearer <token>` or a signed-in session is needed",
                headers={"WWW-Authenticate": 'Bearer realm="keel-codec"'},
            )
            return
        body = self._body(MAX_BODY_BYTES)
        if body is None:
            return
        try:
            out = self.owner.transform(operation, body)
        except json_format.ParseError as e:
            self._error(400, f'the body is not {{"payloads": [...]}}: {e}')
            return
        except PayloadDecryptError as e:
            log.warning("decode refused: %s", e)
            self._error(422, str(e))
            return
        except Exception:
            log.exception("%s failed", operation)
            self._error(500, f"{operation} failed; see the codec server's log")
            return
        self._reply(200, out)

    def do_GET(self) -> None:
        if self._route() != "/":
            self._error(404, "not found")
            return
        signed_in = self.owner.authorized(None, self.headers.get("Cookie"))
        self._page(200, signed_in, "")

    def _sign_in(self, login: bool) -> None:
        origin = self._origin()
        same_origin = origin is None or urlsplit(origin).netloc == self.headers.get("Host")
        if not same_origin and "Access-Control-Allow-Origin" not in self._cors():
            self._error(403, "sign in from the codec server's own page")
            return
        if not login:
            self._reply(
                303, headers={"Location": "/", "Set-Cookie": self.owner.session_cookie(True)}
            )
            return
        body = self._body(4096)
        if body is None:
            return
        token = (parse_qs(body.decode(errors="replace")).get("token") or [""])[0].strip()
        if not self.owner.check_token(token):
            log.info("refused a sign-in from %s", self.address_string())
            self._page(401, False, "That is not the token this codec server was given.")
            return
        self._reply(303, headers={"Location": "/", "Set-Cookie": self.owner.session_cookie()})

    def _page(self, status: int, signed_in: bool, note: str) -> None:
        origins = ", ".join(sorted(self.owner.cors_origins)) or "(none)"
        if signed_in:
            form = (
                "<p><b>Signed in.</b> The Web UI decodes payloads in this browser when its "
                "Codec Server settings name this server and <i>Include cross-origin "
                "credentials</i> is on.</p>"
                '<form method="post" action="/logout"><button>Sign out</button></form>'
            )
        else:
            form = (
                '<form method="post" action="/login"><label>Token '
                '<input type="password" name="token" autocomplete="off" autofocus></label> '
                "<button>Sign in</button></form>"
            )
        page = (
            "<!doctype html><meta charset=utf-8><title>Keel codec server</title>"
            "<style>body{font:15px system-ui;max-width:40em;margin:3em auto}</style>"
            "<h1>Keel codec server</h1>"
            f"<p>{html.escape(note)}</p>{form}"
            f"<p>Web UI origins allowed: {html.escape(origins)}</p>"
        )
        self._reply(
            status,
            page.encode(),
            "text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                "form-action 'self'; frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer",
            },
        )


def codec_server_from_settings(
    settings: Settings, *, host: str = "127.0.0.1", port: int | None = None
) -> CodecServer:
    """A codec server with the settings' keys, token and Web UI origins."""
    keys = settings.key_ring()
    if keys is None:
        raise SettingsError(
            "the codec server needs the keys: set KEEL_ENCRYPTION_KEYS or "
            "KEEL_ENCRYPTION_KEYS_FILE (make a key with `keel keygen`)"
        )
    if not settings.codec_auth_token:
        raise SettingsError(
            "the codec server needs a token: set KEEL_CODEC_AUTH_TOKEN "
            "(make one with `keel keygen --token`)"
        )
    return CodecServer(
        EncryptionCodec(keys),
        settings.codec_auth_token,
        host=host,
        port=settings.codec_port if port is None else port,
        cors_origins=settings.cors_origins,
    )


def dev_token(settings: Settings) -> tuple[str, Path | None]:
    """The token for `keel dev`'s codec server: KEEL_CODEC_AUTH_TOKEN, or one kept in the
    embedded default's home (made on first use, readable by its owner only)."""
    if settings.codec_auth_token:
        return settings.codec_auth_token, None
    path = settings.home / "codec-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(new_token() + "\n")
    return path.read_text().strip(), path


async def serve(server: CodecServer) -> None:
    """Serve until SIGINT or SIGTERM (`keel codec-server`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        server.start()
    except CodecServerError as e:
        raise SettingsError(str(e)) from e
    print(
        f"Codec server at {server.url} (keys {', '.join(server.codec.keys.ids)}; Web UI "
        f"origins {', '.join(sorted(server.cors_origins))}). Ctrl-C stops it.",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        server.stop()
