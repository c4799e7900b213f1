"""Settings, read once at the edge (client, worker), never inside a workflow.

How to reach Temporal comes from Temporal's own environment configuration
(`temporalio.envconfig`: `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`,
`TEMPORAL_TLS*`, `TEMPORAL_PROFILE`, `TEMPORAL_CONFIG_FILE` and its TOML profiles). Keel's own
settings (task queue, model, payload storage, what a worker serves) are `KEEL_*` and
`OPENAI_*` variables, all read here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, Plugin
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import DataConverter, DefaultPayloadConverter, ExternalStorage
from temporalio.envconfig import ClientConfigProfile

TASK_QUEUE = "keel-agents"
DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
UI_PORT = 8233
DEFAULT_MODEL_PORT = 8765  # the scripted model of the embedded default
DEFAULT_PAYLOAD_THRESHOLD = 16 * 1024


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and says what would do."""


@dataclass(frozen=True)
class Settings:
    """Where Temporal and the model are, and what a worker serves, as the environment says."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    task_queue: str = TASK_QUEUE
    # the rest of Temporal's connection profile: api_key, tls, rpc_metadata
    temporal: Mapping[str, Any] = field(default_factory=dict)
    ui_url: str = f"http://localhost:{UI_PORT}"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    model: str = "scripted"
    model_port: int = DEFAULT_MODEL_PORT
    home: Path = Path(".keel")  # the embedded default's state: dev server database, ledger
    payload_dir: str | None = None  # set: large payloads (transcripts) leave the history
    payload_s3_bucket: str | None = None  # the same, into an S3 (or S3-compatible) bucket
    payload_threshold: int = DEFAULT_PAYLOAD_THRESHOLD
    agents: str | None = None  # what `keel worker` serves: `module:attribute`
    resources: str | None = None  # and the resources its tools get: `module:attribute`
    workflows: str | None = None  # and loops of the team's own beside Keel's: `module:attribute`
    durable_fsync: bool = False  # the embedded dev server: SQLite's full fsync (slower)

    @property
    def uses_scripted_model(self) -> bool:
        """No provider configured: the embedded scripted model answers."""
        return not self.openai_base_url and not self.openai_api_key

    @property
    def stores_payloads(self) -> bool:
        """Large payloads go outside the history (a directory or an S3 bucket)."""
        return bool(self.payload_dir or self.payload_s3_bucket)

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
        return cls(
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
            durable_fsync=env.get("KEEL_DURABLE_FSYNC", "").lower() in ("1", "true", "yes", "on"),
        )

    def data_converter(self, base: DataConverter | None = None) -> DataConverter:
        """Keel's converter: pydantic JSON over `base` (its codec, if any, is kept); with
        KEEL_PAYLOAD_S3_BUCKET or KEEL_PAYLOAD_DIR set, payloads above the threshold are
        stored there and the history keeps a reference."""
        converter = base or pydantic_data_converter
        if converter.payload_converter_class is DefaultPayloadConverter:
            converter = dataclasses.replace(
                converter, payload_converter_class=PydanticPayloadConverter
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


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None


async def connect(settings: Settings | None = None, plugins: Sequence[Plugin] = ()) -> Client:
    """A Temporal client with Keel's data converter, from the settings' connection profile."""
    s = settings or Settings.from_env()
    return await Client.connect(
        s.address,
        namespace=s.namespace,
        data_converter=s.data_converter(),
        plugins=plugins,
        **s.temporal,
    )
