"""Validate a checkpoint manifest (``manifests/<id>.json``) before anything is built from it. Pure.

Whoever can write the S3 prefix (usually the job) can write a manifest, and the agent that reads it
is root. So a manifest is input, not a record we trust: every field is checked for type, range and
consistency (sizes, part counts, keys) before the restore allocates a single chunk, and a manifest
that does not verify is refused as a whole with one line saying what and where. The caller skips it
and falls back to the next older manifest. The checks mirror exactly what ``CheckpointStore``
writes, so a manifest the agent wrote always passes.

What comes back is a fresh, normalized dict holding only the fields named here: the rest of the
code indexes it without ``.get`` guards, and unknown fields never reach it.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import math
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from agent.transfer.keys import key_to_relpath

FORMAT = "spot-agent-checkpoint/1"
ID_RE = re.compile(r"^(\d{8}T\d{6})\.(\d{6})Z-[0-9a-f]{6}$")

# Bounds. Each is far above what a real checkpoint needs and low enough that the checks, not the
# allocation, decide what happens with a hostile value.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # the body is refused before json.loads beyond this
MAX_FILES = 1_000_000
MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
MAX_PART_SIZE = 5 * 1024 ** 3  # S3's limit on one part (and on a single PUT)
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_TEXT = 4096  # reason, host, source_dir
FUTURE_SLACK = 3600.0  # an id more than this far in the future is a forged or skewed one
INT64 = 2 ** 63
DIGEST_BYTES = {"sha256": 32, "crc32": 4, "crc32c": 4}
MODE_BITS = 0o1777  # permission bits and sticky; never setuid/setgid (a restore runs as root)


class ManifestError(ValueError):
    """The manifest does not verify; ``str()`` is one line naming the field."""


def _fail(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: {what}")


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where, f"expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _fail(where, f"{v} is out of range [{lo}, {hi}]")
    return v


def _text(v: Any, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(v, str):
        raise _fail(where, f"expected a string, got {type(v).__name__}")
    if len(v) > limit:
        raise _fail(where, f"longer than {limit} characters")
    if "\x00" in v:
        raise _fail(where, "contains a NUL byte")
    return v


def id_time(cid: str) -> Optional[float]:
    """The UTC time an id names, or None when it is not one of our ids."""
    m = ID_RE.match(cid) if isinstance(cid, str) else None
    if not m:
        return None
    try:
        t = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%S"))
    except ValueError:
        return None
    return t + int(m.group(2)) / 1e6


def relpath(v: Any, where: str) -> str:
    """A relative path inside the checkpoint dir: the same rules as a dataset key, plus encodable."""
    p = _text(v, where, MAX_PATH_BYTES)
    if not p:
        raise _fail(where, "empty path")
    try:
        raw = p.encode("utf-8", "surrogateescape")  # what os.fsencode does with a name os.walk gave us
    except UnicodeEncodeError:
        raise _fail(where, f"{p!r} is not a file name this system can encode") from None
    if len(raw) > MAX_PATH_BYTES:
        raise _fail(where, f"longer than {MAX_PATH_BYTES} bytes")
    verdict = key_to_relpath(p, "")
    if verdict.path != p:
        raise _fail(where, verdict.reason or f"{p!r} is not a plain relative path")
    return p


def _checksum(v: Any, where: str, size: int) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(where, f"expected an object, got {type(v).__name__}")
    alg = v.get("algorithm")
    if not isinstance(alg, str) or alg not in DIGEST_BYTES:
        raise _fail(f"{where}.algorithm", f"{alg!r} is not one of {', '.join(DIGEST_BYTES)}")
    part_size = _int(v.get("part_size"), f"{where}.part_size", 1, MAX_PART_SIZE)
    parts = v.get("parts")
    if not isinstance(parts, list):
        raise _fail(f"{where}.parts", f"expected a list, got {type(parts).__name__}")
    # The count follows from size and part_size: checked before anything is built per part.
    want = max(1, -(-size // part_size))
    if want > MAX_PARTS:
        raise _fail(where, f"size {size} in parts of {part_size} bytes is {want} parts; at most {MAX_PARTS}")
    if len(parts) != want:
        raise _fail(f"{where}.parts", f"{len(parts)} checksums for {want} parts of size {size}")
    n = DIGEST_BYTES[alg]
    out: List[str] = []
    for i, s in enumerate(parts):
        w = f"{where}.parts[{i}]"
        if not isinstance(s, str) or len(s) != 4 * -(-n // 3):
            raise _fail(w, f"not a base64 {alg} digest")
        try:
            ok = len(base64.b64decode(s, validate=True)) == n
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise _fail(w, f"not a base64 {alg} digest")
        out.append(s)
    return {"algorithm": alg, "part_size": part_size, "parts": out}


def _entry(e: Any, where: str, cid: str) -> Dict[str, Any]:
    if not isinstance(e, dict):
        raise _fail(where, f"expected an object, got {type(e).__name__}")
    path = relpath(e.get("path"), f"{where}.path")
    where = f"file {path!r}"
    size = _int(e.get("size"), f"{where}.size", 0, MAX_PARTS * MAX_PART_SIZE)
    key = _text(e.get("key"), f"{where}.key", MAX_PATH_BYTES + 64)
    # Exactly data/<id>/<path>: this checkpoint's upload or an earlier one's that it reuses.
    owner, sep, rest = key[len("data/"):].partition("/") if key.startswith("data/") else ("", "", "")
    if not sep or rest != path or id_time(owner) is None or owner > cid:
        raise _fail(f"{where}.key", f"{key!r} is not data/<id>/{path} of this or an earlier checkpoint")
    out: Dict[str, Any] = {"path": path, "size": size, "key": key,
                           "checksum": _checksum(e.get("checksum"), f"{where}.checksum", size),
                           "mtime_ns": _int(e.get("mtime_ns"), f"{where}.mtime_ns", -INT64, INT64 - 1),
                           "ctime_ns": _int(e.get("ctime_ns"), f"{where}.ctime_ns", -INT64, INT64 - 1),
                           "ino": _int(e.get("ino"), f"{where}.ino", 0, 2 ** 64 - 1)}
    # Owner and mode (recorded so a restore gives files back to the job's user); optional.
    for name, hi in (("uid", 2 ** 32 - 2), ("gid", 2 ** 32 - 2)):
        if name in e:
            out[name] = _int(e[name], f"{where}.{name}", 0, hi)
    if "mode" in e:
        # Permission bits. setuid/setgid are dropped, never restored: a manifest claiming uid 0 and
        # mode 4755 would otherwise have a root agent create a setuid-root file of the job's choosing.
        out["mode"] = _int(e["mode"], f"{where}.mode", 0, 0o7777) & MODE_BITS
    return out


def validate(doc: Any, cid: str, now: Optional[float] = None) -> Dict[str, Any]:
    """``doc`` (parsed JSON) as the manifest of checkpoint ``cid``, normalized; else ManifestError."""
    if not isinstance(doc, dict):
        raise _fail("manifest", f"expected an object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise _fail("format", f"{str(doc.get('format'))[:80]!r} is not {FORMAT!r}")
    when = id_time(cid)
    if when is None:
        raise _fail("id", f"{cid[:80]!r} is not a checkpoint id")
    if doc.get("id") != cid:
        raise _fail("id", f"{str(doc.get('id'))[:80]!r} does not match the manifest's name {cid!r}")
    created = doc.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise _fail("created", "expected a finite number")
    if abs(created - when) > 1.0:
        raise _fail("created", f"{created} does not match the time in the id ({when})")
    if when > (time.time() if now is None else now) + FUTURE_SLACK:
        raise _fail("id", f"{cid} is more than {FUTURE_SLACK:.0f}s in the future")
    files = doc.get("files")
    if not isinstance(files, list):
        raise _fail("files", f"expected a list, got {type(files).__name__}")
    if len(files) > MAX_FILES:
        raise _fail("files", f"{len(files)} entries; at most {MAX_FILES}")
    entries = []
    seen = set()
    for i, e in enumerate(files):
        ent = _entry(e, f"files[{i}]", cid)
        if ent["path"] in seen:
            raise _fail(f"files[{i}].path", f"{ent['path']!r} is listed twice")
        seen.add(ent["path"])
        entries.append(ent)
    total = _int(doc.get("total_bytes"), "total_bytes", 0, INT64 - 1)
    if total != sum(e["size"] for e in entries):
        raise _fail("total_bytes", f"{total} is not the sum of the file sizes")
    incomplete = doc.get("incomplete", [])
    if not isinstance(incomplete, list) or len(incomplete) > MAX_FILES:
        raise _fail("incomplete", f"expected a list of at most {MAX_FILES} paths")
    return {"format": FORMAT, "id": cid, "created": float(created),
            "reason": _text(doc.get("reason", ""), "reason"), "host": _text(doc.get("host", ""), "host"),
            "source_dir": _text(doc.get("source_dir", ""), "source_dir"),
            "files": entries, "total_bytes": total,
            "incomplete": [_text(p, f"incomplete[{i}]", MAX_PATH_BYTES) for i, p in enumerate(incomplete)]}


def _no_constants(name: str) -> Any:
    raise ManifestError(f"manifest: {name} is not a JSON number")


def parse(body: bytes, cid: str, now: Optional[float] = None) -> Dict[str, Any]:
    """The bytes of ``manifests/<cid>.json`` -> a validated manifest, or ManifestError."""
    if not isinstance(body, (bytes, bytearray)):
        raise _fail("manifest", "not bytes")
    if len(body) > MAX_MANIFEST_BYTES:
        raise _fail("manifest", f"{len(body)} bytes; at most {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(body, parse_constant=_no_constants)
    except ManifestError:
        raise
    except RecursionError:
        raise _fail("manifest", "nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, an int of 5000 digits
        raise _fail("manifest", f"not JSON: {str(exc)[:200]}") from None
    return validate(doc, cid, now)


def describe(exc: BaseException) -> str:
    """One line for the log and the status, whatever the failure was."""
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__


__all__: Tuple[str, ...] = ("FORMAT", "ID_RE", "ManifestError", "validate", "parse", "relpath", "id_time",
                            "MAX_MANIFEST_BYTES", "MAX_FILES", "MAX_PARTS", "MAX_PART_SIZE")
