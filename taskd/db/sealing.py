"""Task config sealed at rest: what a database dump or the sqlite file holds of it is
ciphertext.

Task config carries third-party secrets (NS1 API keys, HTTP auth headers) that the
server must hand to agents in clear, so it cannot be hashed, only encrypted. The
encryption sits in the column type (`SealedJSON`), so every statement that writes or
reads `task.config` — the task store, routing reads, migrations' data steps — seals and
unseals the same way without knowing about it; the key travels with the engine
(`attach`), not in a global, so two servers in one process may use different keys.

Keys (`db-encryption-key`): files holding one key per line (32 bytes as 64 hex digits or
base64), in order. The first key seals; every key unseals, so a key is rotated by
putting the new one first, running `taskd-db reencrypt`, then removing the old one. A
sealed value names the key that sealed it (a digest prefix, not the key).

Without a key, config is stored in clear as before (the server warns once at start-up),
and a sealed value read without its key is an error naming the key id.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MARK = "$taskd-sealed"  # a sealed config is stored as {MARK: "v1:<key id>:<base64>"}
VERSION = "v1"
_AAD = b"taskd task.config v1"


class SealError(Exception):
    """A sealed value cannot be opened (unknown key, tampered) or a key file is bad."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"taskd key id" + key).hexdigest()[:12]


def _parse_key(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise SealError(f"{where}: a key must be 32 bytes, written as 64 hex digits or base64")
    return key


def load_keys(paths: Iterable[str]) -> list[bytes]:
    """Every key of the files at `paths`, in order; SealError naming the file and line."""
    keys: list[bytes] = []
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SealError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(_parse_key(line, f"{path} line {n}"))
    if paths and not keys:
        raise SealError(f"{', '.join(paths)}: no key found")
    return keys


def sealer_from_setting(value: str) -> "Sealer | None":
    """The `db-encryption-key` value (comma-separated key files) as a Sealer; None when empty."""
    paths = [p.strip() for p in value.split(",") if p.strip()]
    return Sealer(load_keys(paths)) if paths else None


def new_key() -> str:
    """A fresh key as a key file line (what `taskd-db genkey` prints)."""
    return os.urandom(32).hex()


@dataclass(frozen=True)
class Sealer:
    keys: Sequence[bytes]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SealError("a sealer needs at least one key")

    @property
    def current(self) -> str:
        return key_id(self.keys[0])

    def seal(self, value: Any) -> dict:
        nonce = os.urandom(12)
        data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        box = AESGCM(self.keys[0]).encrypt(nonce, data, _AAD)
        return {MARK: f"{VERSION}:{self.current}:{base64.b64encode(nonce + box).decode('ascii')}"}

    def open(self, sealed: str) -> Any:
        try:
            version, kid, blob = sealed.split(":", 2)
            raw = base64.b64decode(blob, validate=True)
        except (ValueError, binascii.Error):
            raise SealError("a sealed task config is malformed") from None
        if version != VERSION:
            raise SealError(f"a task config is sealed in format {version!r}, which this version cannot read")
        for key in self.keys:
            if key_id(key) == kid:
                try:
                    return json.loads(AESGCM(key).decrypt(raw[:12], raw[12:], _AAD))
                except Exception:
                    raise SealError(f"a task config sealed with key {kid} does not decrypt (altered?)") from None
        raise SealError(f"a task config is sealed with key {kid}, which db-encryption-key does not hold")


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {MARK} and isinstance(value[MARK], str)


def attach(engine: sa.Engine, sealer: Sealer | None) -> None:
    """Seal task config written through `engine` (and open what it reads) with `sealer`."""
    engine.dialect.taskd_sealer = sealer  # type: ignore[attr-defined]


def sealer_of(dialect: Any) -> Sealer | None:
    return getattr(dialect, "taskd_sealer", None)


class SealedJSON(sa.types.TypeDecorator):
    """JSON in the database, sealed when the engine has a sealer (see `attach`)."""

    impl = sa.JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        sealer = sealer_of(dialect)
        if sealer is None or value is None or is_sealed(value):
            return value
        return sealer.seal(value)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if not is_sealed(value):
            return value  # stored in clear (no key then, or before sealing was turned on)
        sealer = sealer_of(dialect)
        if sealer is None:
            kid = (value[MARK].split(":") + ["", ""])[1]
            raise SealError(f"a task config is sealed with key {kid}, and no db-encryption-key is set")
        return sealer.open(value[MARK])
