"""Connection settings, read once at the edge (client, worker), never inside a workflow."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, ExternalStorage

TASK_QUEUE = "keel-agents"
DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"
UI_PORT = 8233
MODEL_PORT = int(os.environ.get("KEEL_MODEL_PORT", "8765"))  # the scripted model
STATE_DIR = Path(os.environ.get("KEEL_HOME", ".keel"))


@dataclass(frozen=True)
class Settings:
    """Where Temporal and the model are, as the environment says."""

    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    task_queue: str = TASK_QUEUE
    api_key: str | None = None  # Temporal Cloud API key
    tls: bool = False
    ui_url: str = f"http://localhost:{UI_PORT}"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    model: str = "scripted"
    payload_dir: str | None = None  # set: large payloads (transcripts) leave the history
    payload_s3_bucket: str | None = None  # the same, into an S3 (or S3-compatible) bucket
    payload_threshold: int = 16 * 1024

    @property
    def uses_scripted_model(self) -> bool:
        """No provider configured: the embedded scripted model answers."""
        return not self.openai_base_url and not self.openai_api_key

    @classmethod
    def from_env(cls) -> Settings:
        """Read TEMPORAL_* and OPENAI_* / KEEL_* variables."""
        env = os.environ
        api_key = env.get("TEMPORAL_API_KEY") or None
        return cls(
            address=env.get("TEMPORAL_ADDRESS", DEFAULT_ADDRESS),
            namespace=env.get("TEMPORAL_NAMESPACE", DEFAULT_NAMESPACE),
            task_queue=env.get("KEEL_TASK_QUEUE", TASK_QUEUE),
            api_key=api_key,
            tls=bool(api_key) or env.get("TEMPORAL_TLS", "").lower() in ("1", "true", "yes"),
            ui_url=env.get("KEEL_UI_URL", f"http://localhost:{UI_PORT}"),
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            model=env.get("KEEL_MODEL", env.get("OPENAI_MODEL", "")) or "scripted",
            payload_dir=env.get("KEEL_PAYLOAD_DIR") or None,
            payload_s3_bucket=env.get("KEEL_PAYLOAD_S3_BUCKET") or None,
            payload_threshold=int(env.get("KEEL_PAYLOAD_THRESHOLD", 16 * 1024)),
        )

    def data_converter(self) -> DataConverter:
        """Keel's converter: pydantic JSON; with KEEL_PAYLOAD_S3_BUCKET or KEEL_PAYLOAD_DIR
        set, payloads above the threshold are stored there and the history keeps a reference."""
        from client.storage import LocalDirectoryDriver, s3_driver

        if self.payload_s3_bucket:
            driver = s3_driver(self.payload_s3_bucket)
        elif self.payload_dir:
            driver = LocalDirectoryDriver(self.payload_dir)
        else:
            return pydantic_data_converter
        return dataclasses.replace(
            pydantic_data_converter,
            external_storage=ExternalStorage(
                drivers=[driver], payload_size_threshold=self.payload_threshold
            ),
        )
