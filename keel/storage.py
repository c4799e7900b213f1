"""Payloads headed out of the history, for Temporal's ExternalStorage: a content-addressed
directory (one machine, or a shared volume), or an S3 bucket (any number of machines)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.api.common.v1 import Payload
from temporalio.contrib.aws.s3driver import S3StorageDriverClient
from temporalio.converter import (
    PayloadCodec,
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

from keel.workflows.models import TranscriptSegment

if TYPE_CHECKING:
    from keel.config import Settings

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


class LazyS3Client(S3StorageDriverClient):
    """An aioboto3 S3 client opened on first use, in the loop that uses it, and kept.

    Credentials, region and endpoint come from the usual AWS environment
    (AWS_ACCESS_KEY_ID, AWS_REGION, AWS_ENDPOINT_URL for S3-compatible stores, ...)."""

    def __init__(self) -> None:
        self._inner: S3StorageDriverClient | None = None
        self._stack = contextlib.AsyncExitStack()
        self._lock: asyncio.Lock | None = None

    async def _client(self) -> S3StorageDriverClient:
        if self._inner is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._inner is None:
                    import aioboto3  # the `s3` extra: pip install 'keel[s3]'
                    from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client

                    raw = await self._stack.enter_async_context(aioboto3.Session().client("s3"))
                    self._inner = new_aioboto3_client(raw)
                    _OPEN_S3_CLIENTS.append(self)
        return self._inner

    async def aclose(self) -> None:
        """Close the underlying client (a process that ends need not bother)."""
        self._inner = None
        await self._stack.aclose()

    async def put_object(self, *, bucket: str, key: str, data: bytes) -> None:
        await (await self._client()).put_object(bucket=bucket, key=key, data=data)

    async def object_exists(self, *, bucket: str, key: str) -> bool:
        return await (await self._client()).object_exists(bucket=bucket, key=key)

    async def get_object(self, *, bucket: str, key: str) -> bytes:
        return await (await self._client()).get_object(bucket=bucket, key=key)


_OPEN_S3_CLIENTS: list[LazyS3Client] = []


async def close_s3_clients() -> None:
    """Close every S3 client this process opened (for tests and embedding programs)."""
    while _OPEN_S3_CLIENTS:
        await _OPEN_S3_CLIENTS.pop().aclose()


def s3_driver(bucket: str) -> StorageDriver:
    """Temporal's S3 driver over a lazily opened client: payloads shared by any number of
    machines, keyed by namespace, workflow and content hash."""
    from temporalio.contrib.aws.s3driver import S3StorageDriver

    return S3StorageDriver(client=LazyS3Client(), bucket=bucket)


class SegmentMissing(LookupError):
    """A piece of a stored conversation is not in the store (or is not what it claims)."""


class TranscriptStore:
    """The pieces of conversations model requests refer to (keel.workflows.transcript_ref),
    in the store the worker's payload storage uses: `transcripts/` in the payload directory,
    or `keel-transcripts/` in the bucket. Each is kept under its chain head, encoded with the
    worker's payload codec (encrypted when payloads are)."""

    def __init__(
        self,
        codec: PayloadCodec | None = None,
        *,
        directory: Path | str | None = None,
        bucket: str | None = None,
    ) -> None:
        if (directory is None) == (bucket is None):
            raise ValueError("a transcript store needs a directory or a bucket")
        self._codec = codec
        self._root = Path(directory).resolve() / "transcripts" if directory else None
        self._bucket = bucket
        self._s3: LazyS3Client | None = LazyS3Client() if bucket else None

    def where(self) -> str:
        """Where the pieces are, as a message may say it."""
        return str(self._root) if self._root else f"s3://{self._bucket}/{S3_PREFIX}"

    async def put(self, head: str, segment: TranscriptSegment) -> None:
        """Keep `segment` under `head` (once: the same head is the same content)."""
        payload = Payload(
            metadata={"encoding": b"json/plain"}, data=segment.model_dump_json().encode()
        )
        if self._codec is not None:
            [payload] = await self._codec.encode([payload])
        data = payload.SerializeToString(deterministic=True)
        if self._s3 is not None:
            await self._s3.put_object(bucket=self._bucket or "", key=S3_PREFIX + head, data=data)
        else:
            await asyncio.to_thread(self._write, head, data)

    async def get(self, head: str) -> TranscriptSegment:
        """The segment kept under `head`; SegmentMissing when the store has none."""
        if not DIGEST.fullmatch(head):
            raise SegmentMissing(f"{head!r} is not a chain head")
        if self._s3 is not None:
            try:
                data = await self._s3.get_object(bucket=self._bucket or "", key=S3_PREFIX + head)
            except Exception as e:
                if not _not_found(e):
                    raise  # the store is down, say: the activity's retries try again
                raise SegmentMissing(f"{head} is not in {self.where()}") from None
        else:
            data = await asyncio.to_thread(self._read, head)
        payload = Payload.FromString(data)
        if self._codec is not None:
            [payload] = await self._codec.decode([payload])
        return TranscriptSegment.model_validate_json(payload.data)

    def _path(self, head: str) -> Path:
        assert self._root is not None
        return self._root / head[:2] / head

    def _write(self, head: str, data: bytes) -> None:
        path = self._path(head)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader never sees half a segment
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, head: str) -> bytes:
        try:
            return self._path(head).read_bytes()
        except FileNotFoundError:
            raise SegmentMissing(f"{head} is not in {self.where()}") from None


S3_PREFIX = "keel-transcripts/"


def _not_found(e: Exception) -> bool:
    """Whether an S3 client's error says the object is not there (botocore's NoSuchKey/404)."""
    response = getattr(e, "response", None)
    code = (
        str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    )
    return code in ("NoSuchKey", "404", "NotFound") or type(e).__name__ == "NoSuchKey"


def transcript_store(settings: Settings) -> TranscriptStore | None:
    """The worker's transcript store: where its payload storage is (None without one)."""
    if not settings.stores_payloads:
        return None
    codec = settings.payload_codec()
    if settings.payload_s3_bucket:
        return TranscriptStore(codec, bucket=settings.payload_s3_bucket)
    return TranscriptStore(codec, directory=settings.payload_dir)
