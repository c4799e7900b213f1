"""Settings, read once at the edge (client, worker), never inside a workflow.

How to reach Temporal comes from Temporal's own environment configuration
(`temporalio.envconfig`: `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`,
`TEMPORAL_TLS*`, `TEMPORAL_PROFILE`, `TEMPORAL_CONFIG_FILE` and its TOML profiles). Keel's own
settings (task queue, model, payload storage and encryption, what a worker serves) are
`KEEL_*` and `OPENAI_*` variables, all read here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from temporalio.client import Client, Plugin
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    DefaultPayloadConverter,
    ExternalStorage,
)
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig

from keel.codec import (
    EncryptedPayloadGuard,
    EncryptionCodec,
    KeyConfigError,
    KeyRing,
    with_keel_codec,
)

TASK_QUEUE = "keel-agents"
DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
UI_PORT = 8233
DEFAULT_MODEL_PORT = 8765  # the scripted model of the embedded default
DEFAULT_PAYLOAD_THRESHOLD = 16 * 1024
DEFAULT_METRICS_PORT = 9464  # `keel dev`'s Prometheus endpoint
DEFAULT_CODEC_PORT = 8081  # the codec server the Web UI asks to decode payloads
DEFAULT_API_PORT = 8000  # `keel serve`: the HTTP API and its page
DEFAULT_API_RATE = 20.0  # requests a second per caller (a burst of twice as many)


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and says what would do."""


@dataclass(frozen=True)
class Settings:
    """Where Temporal and the model are, and what a worker serves, as the environment says."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    task_queue: str = TASK_QUEUE
    # the rest of Temporal's connection profile: api_key, tls, rpc_metadata
    temporal: Mapping[str, Any] = field(default_factory=dict, repr=False)  # holds an API key
    ui_url: str = f"http://localhost:{UI_PORT}"
    openai_base_url: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)  # a secret: never printed
    model: str = "scripted"
    model_port: int = DEFAULT_MODEL_PORT
    home: Path = Path(".keel")  # the embedded default's state: dev server database, ledger
    payload_dir: str | None = None  # set: large payloads (transcripts) leave the history
    payload_s3_bucket: str | None = None  # the same, into an S3 (or S3-compatible) bucket
    payload_threshold: int = DEFAULT_PAYLOAD_THRESHOLD
    agents: str | None = None  # what `keel worker` serves: `module:attribute`
    resources: str | None = None  # and the resources its tools get: `module:attribute`
    workflows: str | None = None  # and loops of the team's own beside Keel's: `module:attribute`
    activities: str | None = None  # and the activities those loops call: `module:attribute`
    durable_fsync: bool = False  # the embedded dev server: SQLite's full fsync (slower)
    # set: every payload is encrypted (`id:base64key,...`; the first encrypts, all decrypt)
    encryption_keys: str | None = field(default=None, repr=False)
    encryption_keys_file: str | None = None  # the same, one `id:base64key` per line
    codec_auth_token: str | None = field(default=None, repr=False)  # the codec server's
    codec_port: int = DEFAULT_CODEC_PORT
    codec_cors_origins: tuple[str, ...] = ()  # Web UI origins; default: the one of ui_url
    # who may do what (a TOML or JSON file), loaded by workers; clients use it to refuse early
    # and to show each caller only the runs they may see
    policy_file: str | None = None
    approver_key: str | None = None  # the file of the key `keel approve` signs with
    user: str | None = None  # who the `keel` commands act as (start, list, pending)
    metrics_port: int | None = None  # set: Prometheus metrics (Temporal's and Keel's) served here
    metrics_host: str = "127.0.0.1"
    tracing: str = ""  # "otlp" or "console": OpenTelemetry spans (keel.tracing)
    model_calls_per_second: float = 0.0  # > 0: a worker starts at most this many model calls
    model_task_queue: str = ""  # set: model calls run on this task queue (its own workers)
    tool_task_queue: str = ""  # set: tool calls run on this task queue
    # `keel serve`: who may call (a file of token hashes), from which browser origins, how
    # often, and the directory of each user's signing key (`<user>.pem`)
    api_tokens: str | None = None
    api_cors_origins: tuple[str, ...] = ()
    api_rate: float = DEFAULT_API_RATE  # 0: no limit
    api_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    api_signing_keys: str | None = None

    @property
    def uses_scripted_model(self) -> bool:
        """No provider configured: the embedded scripted model answers."""
        return not self.openai_base_url and not self.openai_api_key

    @property
    def stores_payloads(self) -> bool:
        """Large payloads go outside the history (a directory or an S3 bucket)."""
        return bool(self.payload_dir or self.payload_s3_bucket)

    @property
    def encrypts(self) -> bool:
        """Payloads are encrypted (KEEL_ENCRYPTION_KEYS or KEEL_ENCRYPTION_KEYS_FILE)."""
        return bool(self.encryption_keys or self.encryption_keys_file)

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """The browser origins the codec server answers (the Web UI's)."""
        if self.codec_cors_origins:
            return self.codec_cors_origins
        scheme, _, rest = self.ui_url.partition("://")
        return (f"{scheme}://{rest.split('/', 1)[0]}",)

    def key_ring(self) -> KeyRing | None:
        """The encryption keys, in order (the first encrypts); None when encryption is off."""
        if self.encryption_keys and self.encryption_keys_file:
            raise SettingsError(
                "KEEL_ENCRYPTION_KEYS and KEEL_ENCRYPTION_KEYS_FILE are both set: keep one"
            )
        try:
            if self.encryption_keys:
                return KeyRing.parse(self.encryption_keys)
            if self.encryption_keys_file:
                return KeyRing.from_file(self.encryption_keys_file)
        except KeyConfigError as e:
            raise SettingsError(str(e)) from None
        return None

    def payload_codec(self) -> EncryptionCodec | EncryptedPayloadGuard:
        """Keel's codec: encryption with the configured keys; without keys, a guard that
        refuses encrypted payloads clearly instead of handing ciphertext on."""
        keys = self.key_ring()
        return EncryptionCodec(keys) if keys else EncryptedPayloadGuard()

    @property
    def scripted_model_url(self) -> str:
        return f"http://127.0.0.1:{self.model_port}/v1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Temporal's connection profile plus the KEEL_* and OPENAI_* variables."""
        env = os.environ if env is None else env
        try:
            profile = ClientConfigProfile.load(override_env_vars=_temporal_env(env))
            temporal = dict(profile.to_client_connect_config())
        except (Exception, OSError) as e:  # a malformed config file, a missing TLS file
            raise SettingsError(f"Temporal client configuration: {e}") from e
        settings = cls(
            address=temporal.pop("target_host", None) or DEFAULT_ADDRESS,
            namespace=temporal.pop("namespace", None) or DEFAULT_NAMESPACE,
            task_queue=env.get("KEEL_TASK_QUEUE") or TASK_QUEUE,
            temporal=temporal,
            ui_url=env.get("KEEL_UI_URL", f"http://localhost:{UI_PORT}"),
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            model=env.get("KEEL_MODEL", env.get("OPENAI_MODEL", "")) or "scripted",
            model_port=_int(env, "KEEL_MODEL_PORT", DEFAULT_MODEL_PORT),
            home=Path(env.get("KEEL_HOME") or ".keel"),
            payload_dir=env.get("KEEL_PAYLOAD_DIR") or None,
            payload_s3_bucket=env.get("KEEL_PAYLOAD_S3_BUCKET") or None,
            payload_threshold=_int(env, "KEEL_PAYLOAD_THRESHOLD", DEFAULT_PAYLOAD_THRESHOLD),
            agents=env.get("KEEL_AGENTS") or None,
            resources=env.get("KEEL_RESOURCES") or None,
            workflows=env.get("KEEL_WORKFLOWS") or None,
            activities=env.get("KEEL_ACTIVITIES") or None,
            durable_fsync=env.get("KEEL_DURABLE_FSYNC", "").lower() in ("1", "true", "yes", "on"),
            encryption_keys=env.get("KEEL_ENCRYPTION_KEYS") or None,
            encryption_keys_file=env.get("KEEL_ENCRYPTION_KEYS_FILE") or None,
            codec_auth_token=env.get("KEEL_CODEC_AUTH_TOKEN") or None,
            codec_port=_int(env, "KEEL_CODEC_PORT", DEFAULT_CODEC_PORT),
            metrics_port=_int(env, "KEEL_METRICS_PORT", 0) or None,
            metrics_host=env.get("KEEL_METRICS_HOST") or "127.0.0.1",
            tracing=(env.get("KEEL_TRACING") or "").strip().lower(),
            model_calls_per_second=_float(env, "KEEL_MODEL_CALLS_PER_SECOND", 0.0),
            model_task_queue=env.get("KEEL_MODEL_TASK_QUEUE") or "",
            tool_task_queue=env.get("KEEL_TOOL_TASK_QUEUE") or "",
            codec_cors_origins=_origins(env, "KEEL_CODEC_CORS_ORIGINS"),
            api_tokens=env.get("KEEL_API_TOKENS") or None,
            api_cors_origins=_origins(env, "KEEL_API_CORS_ORIGINS"),
            api_rate=_float(env, "KEEL_API_RATE", DEFAULT_API_RATE),
            api_host=env.get("KEEL_API_HOST") or "127.0.0.1",
            api_port=_int(env, "KEEL_API_PORT", DEFAULT_API_PORT),
            api_signing_keys=env.get("KEEL_API_SIGNING_KEYS") or None,
            policy_file=env.get("KEEL_POLICY") or None,
            approver_key=env.get("KEEL_APPROVER_KEY") or None,
            user=env.get("KEEL_USER") or None,
        )
        settings.key_ring()  # a key that cannot be used fails here, at the edge
        return settings

    def data_converter(self, base: DataConverter | None = None) -> DataConverter:
        """Keel's converter: pydantic JSON over `base`, with Keel's codec applied after
        `base`'s own codec, if any (encryption with KEEL_ENCRYPTION_KEYS, and failures'
        messages moved into the encrypted payload); with KEEL_PAYLOAD_S3_BUCKET or
        KEEL_PAYLOAD_DIR set, payloads above the threshold are stored there and the history
        keeps a reference. Temporal encodes before it stores, so a stored payload is
        encrypted too."""
        converter = base or pydantic_data_converter
        if converter.payload_converter_class is DefaultPayloadConverter:
            converter = dataclasses.replace(
                converter, payload_converter_class=PydanticPayloadConverter
            )
        codec = self.payload_codec()
        converter = dataclasses.replace(
            converter, payload_codec=with_keel_codec(converter.payload_codec, codec)
        )
        if isinstance(codec, EncryptionCodec) and (
            converter.failure_converter_class is DefaultFailureConverter
        ):
            # a failure's message and stack trace can quote arguments: encrypt them too
            converter = dataclasses.replace(
                converter, failure_converter_class=DefaultFailureConverterWithEncodedAttributes
            )
        driver = self._storage_driver()
        if driver is None or converter.external_storage is not None:
            return converter
        return dataclasses.replace(
            converter,
            external_storage=ExternalStorage(
                drivers=[driver], payload_size_threshold=self.payload_threshold
            ),
        )

    def _storage_driver(self) -> Any:
        from keel.storage import LocalDirectoryDriver, s3_driver

        if self.payload_s3_bucket:
            return s3_driver(self.payload_s3_bucket)
        if self.payload_dir:
            return LocalDirectoryDriver(self.payload_dir)
        return None


def _temporal_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment as Temporal's loader should see it: an empty variable is unset (as
    compose passes them), and TEMPORAL_TLS=no/off means off."""
    out = {k: v for k, v in env.items() if v}
    if out.get("TEMPORAL_TLS", "").strip().lower() in ("0", "no", "off", "false"):
        out["TEMPORAL_TLS"] = "false"
    return out


N = TypeVar("N", int, float)


def env_number(env: Mapping[str, str], name: str, kind: type[N], default: Any = None) -> Any:
    """The variable as a number of `kind` (not negative), or `default` when it is unset."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name}={raw!r} is not {what}") from None
    if value < 0:
        raise SettingsError(f"{name}={raw!r} must not be negative")
    return value


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Browser origins, comma separated (a trailing slash dropped)."""
    return tuple(o.strip().rstrip("/") for o in env.get(name, "").split(",") if o.strip())


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return float(env_number(env, name, float, default))


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return int(env_number(env, name, int, default))


async def connect(settings: Settings | None = None, plugins: Sequence[Plugin] = ()) -> Client:
    """A Temporal client with Keel's data converter, from the settings' connection profile."""
    s = settings or Settings.from_env()
    extra: dict[str, Any] = {}
    if s.metrics_port:
        from keel.metrics import prometheus_runtime

        extra["runtime"] = prometheus_runtime(s.metrics_host, s.metrics_port)
    if s.tracing:
        from keel.tracing import tracing_plugin

        plugins = [*plugins, tracing_plugin(s)]
    return await Client.connect(
        s.address,
        namespace=s.namespace,
        data_converter=s.data_converter(),
        plugins=plugins,
        **extra,
        **s.temporal,
    )


def core_logging() -> LoggingConfig:
    """How Temporal's own (Rust) log lines are written: coloured, straight to a terminal;
    anywhere else (a file, a pipe, a log collector) through Python's logging as
    `temporalio.core`, as plain text with no escape codes."""
    if sys.stderr.isatty():
        return LoggingConfig.default
    forwarding = LogForwardingConfig(
        logger=logging.getLogger("temporalio.core"), append_target_to_name=False
    )
    return dataclasses.replace(LoggingConfig.default, forwarding=forwarding)


def use_core_logging() -> None:
    """Make the process's Temporal runtime write its logs as `core_logging` says; before
    the first client connects."""
    if sys.stderr.isatty():
        return  # the SDK's default runtime does just that
    telemetry = TelemetryConfig(logging=core_logging())
    Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)
