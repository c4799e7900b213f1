"""Payloads headed out of the history: a content-addressed directory for Temporal's
ExternalStorage. Every worker and client of a namespace must share the directory (one
machine, or a shared volume); past that, use an object store driver instead."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_PAYLOAD_FILE_BYTES = 256 * 1024 * 1024


class PayloadNotFound(LookupError):
    """A history refers to a payload the directory does not hold."""


class LocalDirectoryDriver(StorageDriver):
    """Stores each large payload once, under its SHA-256, in a directory."""

    def __init__(self, root: Path | str, name: str = "keel.local-directory") -> None:
        self.root = Path(root).resolve()
        self._name = name

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return "keel.local-directory"

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        """Write each payload (once per content) and return its claim."""
        return await asyncio.to_thread(self._store, payloads)

    def _store(self, payloads: Sequence[Payload]) -> list[StorageDriverClaim]:
        claims = []
        for p in payloads:
            data = p.SerializeToString(deterministic=True)
            digest = hashlib.sha256(data).hexdigest()
            path = self._path(digest)
            if not (path.is_file() and path.stat().st_size == len(data)):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")  # unique per writer
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)  # atomic: a reader never sees half a payload
                finally:
                    tmp.unlink(missing_ok=True)
            claims.append(StorageDriverClaim(claim_data={"sha256": digest}))
        return claims

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        """Read each claimed payload back, checking its digest."""
        return await asyncio.to_thread(self._retrieve, claims)

    def _retrieve(self, claims: Sequence[StorageDriverClaim]) -> list[Payload]:
        out = []
        for claim in claims:
            digest = claim.claim_data.get("sha256", "")
            if not DIGEST.fullmatch(digest):
                # not a claim this driver made (e.g. a hand-made reference in a signal):
                # decode it as null, which whoever reads it refuses as malformed input
                out.append(Payload(metadata={"encoding": b"json/plain"}, data=b"null"))
                continue
            path = self._path(digest)
            try:
                if not path.is_file() or path.stat().st_size > MAX_PAYLOAD_FILE_BYTES:
                    raise FileNotFoundError(path)
                data = path.read_bytes()
            except FileNotFoundError:
                raise PayloadNotFound(
                    f"payload {digest} is not in {self.root}: every worker and client must "
                    "share the KEEL_PAYLOAD_DIR directory"
                ) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise PayloadNotFound(f"payload {digest} in {self.root} is corrupt")
            out.append(Payload.FromString(data))
        return out
