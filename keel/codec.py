"""Encrypted payloads: a Temporal payload codec doing AES-256-GCM with keys chosen by id.

Every payload a client or worker writes (workflow input and result, activity arguments and
results, signals, updates, queries, memos, summaries, heartbeats, failures' messages) is
encrypted before it leaves the process, so Temporal's history and the payloads external
storage keeps out of it hold ciphertext only. The key ring is ordered: the first key
encrypts, every key decrypts, so a key is rotated by putting a new one first and keeping
the old one until no run needs it.

Format of an encrypted payload (the inner payload, metadata and data, is what is sealed):

    metadata  encoding: binary/encrypted
              encryption-key-id: <key id>
              encryption-cipher: keel/aes-256-gcm/1
    data      nonce (12 random bytes) || AES-256-GCM(inner payload) with its 16-byte tag

The cipher name and the key id are authenticated as associated data: a payload whose key id
was changed, or whose ciphertext was touched, fails to decrypt instead of decoding to
something else. A payload without the encrypted encoding (a run from before encryption was
on, a signal typed in by hand) passes through decoding unchanged.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
CIPHER = "encryption-cipher"
CIPHER_NAME = b"keel/aes-256-gcm/1"
NONCE_BYTES = 12
KEY_BYTES = 32
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEYS_HELP = "KEEL_ENCRYPTION_KEYS (or KEEL_ENCRYPTION_KEYS_FILE)"


class KeyConfigError(ValueError):
    """Encryption keys that cannot be used; the message says which and why, never the key."""


class PayloadDecryptError(RuntimeError):
    """An encrypted payload this process cannot decrypt: the message says why (unknown key
    id, no keys at all, or a payload that fails authentication)."""


class UnknownKeyError(PayloadDecryptError):
    """The payload was encrypted with a key this process does not have."""

    def __init__(self, key_id: str, message: str) -> None:
        super().__init__(message)
        self.key_id = key_id


@dataclass(frozen=True)
class EncryptionKey:
    """One AES-256 key and the id payloads name it by."""

    id: str
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KEY_ID_PATTERN.fullmatch(self.id):
            raise KeyConfigError(
                f"encryption key id {self.id!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )
        if len(self.material) != KEY_BYTES:
            raise KeyConfigError(
                f"encryption key {self.id!r} is {len(self.material)} bytes; AES-256 needs "
                f"{KEY_BYTES} (make one with `keel keygen`)"
            )


@dataclass(frozen=True)
class KeyRing:
    """Keys by id, in order: the first encrypts, all decrypt."""

    keys: tuple[EncryptionKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyConfigError(f"no encryption keys in {KEYS_HELP}")
        seen: dict[str, bytes] = {}
        for k in self.keys:
            if k.id in seen:
                raise KeyConfigError(f"encryption key id {k.id!r} is given twice")
            seen[k.id] = k.material

    @property
    def current(self) -> EncryptionKey:
        """The key new payloads are encrypted with."""
        return self.keys[0]

    @property
    def ids(self) -> list[str]:
        return [k.id for k in self.keys]

    @classmethod
    def parse(cls, spec: str, source: str = "KEEL_ENCRYPTION_KEYS") -> KeyRing:
        """`id:base64key` entries separated by commas or new lines (`#` starts a comment)."""
        keys = []
        for n, line in enumerate(spec.splitlines(), 1):
            line = line.split("#", 1)[0]
            for entry in line.split(","):
                entry = entry.strip()
                if not entry:
                    continue
                key_id, sep, encoded = entry.partition(":")
                where = f"{source} (line {n})" if "\n" in spec.strip() else source
                if not sep:
                    raise KeyConfigError(
                        f"{where}: an entry is not `id:base64key` (its text is not shown)"
                    )
                keys.append(EncryptionKey(key_id.strip(), _decode_key(encoded, key_id, where)))
        if not keys:
            raise KeyConfigError(f"{source} names no encryption key")
        return cls(tuple(keys))

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Keys from a file of `id:base64key` lines (keep it readable by the service only)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise KeyConfigError(f"KEEL_ENCRYPTION_KEYS_FILE {path}: {e.strerror or e}") from e
        return cls.parse(text, source=f"KEEL_ENCRYPTION_KEYS_FILE {path}")


def _decode_key(encoded: str, key_id: str, where: str) -> bytes:
    """Standard or URL-safe base64, padded or not."""
    text = encoded.strip()
    padded = text + "=" * (-len(text) % 4)
    try:
        if re.fullmatch(r"[A-Za-z0-9+/]*=*", padded):
            return base64.b64decode(padded, validate=True)
        if re.fullmatch(r"[A-Za-z0-9_-]*=*", padded):
            return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        pass
    raise KeyConfigError(f"{where}: key {key_id.strip()!r} is not valid base64")


def new_key(key_id: str | None = None) -> str:
    """A fresh `id:base64key` entry (the id defaults to today's date and a random suffix)."""
    key_id = key_id or f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(2)}"
    key = EncryptionKey(key_id, AESGCM.generate_key(bit_length=256))
    return f"{key.id}:{base64.b64encode(key.material).decode()}"


def key_id_of(payload: Payload) -> str | None:
    """The id of the key a payload is encrypted with; None if it is not encrypted."""
    if payload.metadata.get("encoding") != ENCODING:
        return None
    return payload.metadata.get(KEY_ID, b"").decode(errors="replace")


def _associated_data(key_id: str) -> bytes:
    return CIPHER_NAME + b"\x00" + key_id.encode()


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload with the ring's first key; decrypts with whichever key the
    payload names, and refuses (clearly) one it cannot decrypt."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys
        self._ciphers = {k.id: AESGCM(k.material) for k in keys.keys}

    def __repr__(self) -> str:
        return f"EncryptionCodec(keys={self.keys.ids})"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload with the current key."""
        return self.encrypt(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt each encrypted payload; pass the others through."""
        return self.decrypt(payloads)

    def encrypt(self, payloads: Iterable[Payload]) -> list[Payload]:
        """`encode`, without the event loop (for the codec server's threads)."""
        key_id = self.keys.current.id
        cipher = self._ciphers[key_id]
        aad = _associated_data(key_id)
        out = []
        for p in payloads:
            nonce = os.urandom(NONCE_BYTES)
            sealed = cipher.encrypt(nonce, p.SerializeToString(deterministic=True), aad)
            out.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID: key_id.encode(), CIPHER: CIPHER_NAME},
                    data=nonce + sealed,
                )
            )
        return out

    def decrypt(self, payloads: Iterable[Payload]) -> list[Payload]:
        """`decode`, without the event loop (for the codec server's threads)."""
        return [self._decrypt_one(p) for p in payloads]

    def _decrypt_one(self, p: Payload) -> Payload:
        key_id = key_id_of(p)
        if key_id is None:
            return p
        cipher_name = p.metadata.get(CIPHER, b"")
        if cipher_name != CIPHER_NAME:
            raise PayloadDecryptError(
                f"an encrypted payload (key id {key_id!r}) uses the cipher "
                f"{cipher_name.decode(errors='replace') or '(none named)'}, not "
                f"{CIPHER_NAME.decode()}: it was not written by Keel's codec"
            )
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKeyError(
                key_id,
                f"a payload is encrypted with key id {key_id!r}, which this process does not "
                f"have (it has {', '.join(self.keys.ids)}): add that key to {KEYS_HELP}",
            )
        data = p.data
        if len(data) < NONCE_BYTES + 16:
            raise PayloadDecryptError(f"an encrypted payload (key id {key_id!r}) is truncated")
        try:
            inner = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _associated_data(key_id))
        except InvalidTag:
            raise PayloadDecryptError(
                f"an encrypted payload (key id {key_id!r}) fails authentication: it was "
                "altered, or encrypted with another key under the same id"
            ) from None
        return Payload.FromString(inner)


class EncryptedPayloadGuard(PayloadCodec):
    """The codec of a process without keys: it encodes nothing, and refuses an encrypted
    payload with a clear error instead of letting it reach the payload converter (where a
    signal would be dropped, or a record filled with ciphertext)."""

    def __repr__(self) -> str:
        return "EncryptedPayloadGuard()"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        for p in payloads:
            key_id = key_id_of(p)
            if key_id is not None:
                raise UnknownKeyError(
                    key_id,
                    f"a payload is encrypted (key id {key_id!r}) and this process has no "
                    f"encryption keys: set {KEYS_HELP} as on the workers",
                )
        return list(payloads)


class ChainedCodec(PayloadCodec):
    """Codecs applied in order on encode and in reverse order on decode."""

    def __init__(self, codecs: Sequence[PayloadCodec]) -> None:
        self.codecs = tuple(codecs)

    def __repr__(self) -> str:
        return f"ChainedCodec({list(self.codecs)})"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for c in self.codecs:
            out = await c.encode(out)
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = list(payloads)
        for c in reversed(self.codecs):
            out = await c.decode(out)
        return out


KeelCodec = EncryptionCodec | EncryptedPayloadGuard


def with_keel_codec(existing: PayloadCodec | None, keel: KeelCodec) -> PayloadCodec:
    """`existing` (a codec of the user's own, say compression) with Keel's replacing any
    Keel codec it had, applied last on encode: what leaves the process is encrypted."""
    others = [
        c
        for c in (existing.codecs if isinstance(existing, ChainedCodec) else [existing])
        if c is not None and not isinstance(c, EncryptionCodec | EncryptedPayloadGuard)
    ]
    return ChainedCodec([*others, keel]) if others else keel


def keel_codec_of(codec: PayloadCodec | None) -> KeelCodec | None:
    """The Keel codec inside a converter's codec, if any."""
    if isinstance(codec, EncryptionCodec | EncryptedPayloadGuard):
        return codec
    if isinstance(codec, ChainedCodec):
        for c in codec.codecs:
            if isinstance(c, EncryptionCodec | EncryptedPayloadGuard):
                return c
    return None


def new_token() -> str:
    """A random bearer token for the codec server."""
    return secrets.token_urlsafe(32)
