"""The checksums S3 can verify on upload, computed here so the manifest can be verified on restore.

S3 wants base64 of the big-endian digest in ``x-amz-checksum-<alg>``. SHA256 and CRC32 come from the
standard library; CRC32C needs awscrt (botocore[crt]) and is refused with a clear error without it.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Any, Dict

S3_NAMES: Dict[str, str] = {"sha256": "SHA256", "crc32": "CRC32", "crc32c": "CRC32C"}


class _CRC:
    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._v = 0

    def update(self, data: bytes) -> None:
        self._v = self._fn(data, self._v)

    def digest(self) -> bytes:
        return (self._v & 0xFFFFFFFF).to_bytes(4, "big")


def available(alg: str) -> bool:
    if alg == "crc32c":
        try:
            import awscrt.checksums  # noqa: F401
        except ImportError:
            return False
    return alg in S3_NAMES


def new(alg: str) -> Any:
    if alg == "sha256":
        return hashlib.sha256()
    if alg == "crc32":
        return _CRC(zlib.crc32)
    if alg == "crc32c":
        try:
            from awscrt.checksums import crc32c
        except ImportError:
            raise ValueError("checksum = \"crc32c\" needs awscrt (pip install 'botocore[crt]'); use sha256 or crc32") from None
        return _CRC(lambda data, prev: crc32c(data, prev))
    raise ValueError(f"unknown checksum {alg!r}; use one of {', '.join(S3_NAMES)}")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def of_bytes(alg: str, data: bytes) -> str:
    h = new(alg)
    h.update(data)
    return b64(h.digest())
