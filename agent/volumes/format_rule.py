"""May this device be formatted? The one rule that licenses mkfs, as pure functions.

Why a rule and not "blkid found nothing": blkid only knows signatures. Plain dm-crypt, an ext4 whose
first superblock was overwritten, or an md 1.0 member of a volume that was grown afterwards all hold
data that no probe names. So "no signature" is never enough on its own. A volume is formatted only

- when spot-agent created it empty itself (CreateVolume without a snapshot, recorded in the state
  with its volume id before and after the call, so a crash in between still knows), or
- when its config says ``format_existing = "if-never-written"`` and it reads as never written: all
  zeros in its first and last MiB and in a fixed spread of sampled blocks (:func:`sample_extents`).

Anything else with no recognisable filesystem is refused with one line naming volume and device.
Instance-store scratch (ephemeral by definition, handed to the agent by ``instance_store = true``)
is formatted when it carries no signature, as before. Read-only, multi-attach and snapshot-based
volumes are never formatted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

NEVER = "never"
IF_NEVER_WRITTEN = "if-never-written"
POLICIES = (NEVER, IF_NEVER_WRITTEN)

MiB = 1024 * 1024
EDGE_BYTES = MiB  # read whole at both ends: partition tables, superblocks, md/LVM metadata live there
SAMPLE_BLOCKS = 128  # one block per equal stratum of the rest: a region of data > size/128 is always hit
SAMPLE_BLOCK_BYTES = 64 * 1024  # so at most 2 MiB + 8 MiB are read, whatever the size of the volume
ALIGN = 4096

Extent = Tuple[int, int]  # (offset, length) in bytes


def sample_extents(size: int, count: int = SAMPLE_BLOCKS, block: int = SAMPLE_BLOCK_BYTES,
                   edge: int = EDGE_BYTES) -> List[Extent]:
    """What to read to decide "never written": the first and last ``edge`` bytes, and ``count``
    blocks, one inside each of ``count`` equal strata of what lies between them.

    Deterministic (the position inside each stratum comes from a hash of its index, 4 KiB aligned),
    so a decision can be repeated and tested; stratified, so no stride-aligned pattern is missed
    everywhere. A device too small for that is read whole. Extents are sorted and do not overlap.
    """
    if size <= 0:
        return []
    if size <= 2 * edge + count * block:
        return [(0, size)]
    out: List[Extent] = [(0, edge)]
    start, end = edge, size - edge
    span = end - start
    for i in range(count):
        lo = start + span * i // count
        hi = start + span * (i + 1) // count
        room = max(0, hi - lo - block)
        jitter = int.from_bytes(hashlib.sha256(b"spot-agent-sample-%d" % i).digest()[:8], "big")
        off = lo + (jitter % (room + 1) if room else 0)
        off = max(lo, off - off % ALIGN)
        out.append((off, min(block, end - off)))
    out.append((end, edge))
    return _merge(out)


def _merge(extents: List[Extent]) -> List[Extent]:
    merged: List[Extent] = []
    for off, length in sorted(e for e in extents if e[1] > 0):
        if merged and off <= merged[-1][0] + merged[-1][1]:
            last_off, last_len = merged[-1]
            merged[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            merged.append((off, length))
    return merged


def first_nonzero(data: bytes) -> int:
    """Index of the first non-zero byte of ``data``, or -1 when it is all zeros."""
    rest = data.lstrip(b"\0")
    return -1 if not rest else len(data) - len(rest)


@dataclass(frozen=True)
class WrittenCheck:
    """What reading the sample found."""

    never_written: bool
    first_nonzero: int = -1  # absolute byte offset of the first non-zero byte seen; -1: none
    bytes_read: int = 0
    error: str = ""  # a read that failed or came back short: never counts as never written

    def describe(self) -> str:
        if self.error:
            return f"could not be read ({self.error})"
        if self.never_written:
            return f"reads as never written ({self.bytes_read >> 10} KiB sampled, all zeros)"
        return f"holds data (a non-zero byte at offset {self.first_nonzero})"


@dataclass(frozen=True)
class FormatFacts:
    """Everything the decision depends on, gathered by the manager."""

    name: str  # the [[volumes]] name
    device: str
    volume_id: str = ""  # "" for instance-store scratch
    blank: bool = True  # blkid -p found no signature at all
    instance_store: bool = False
    read_only: bool = False
    multi_attach: bool = False
    from_snapshot: bool = False
    created_empty: bool = False  # the state says spot-agent created exactly this volume id empty and has not formatted it yet
    policy: str = NEVER  # [[volumes]] format_existing


@dataclass(frozen=True)
class Decision:
    format: bool
    reason: str  # why (for the progress line when formatting, the error when refusing)
    needs_scan: bool = False  # the answer depends on reading the sample (decide again with it)


def _who(f: FormatFacts) -> str:
    return f"volume {f.name} ({f.volume_id or 'instance store'}) on {f.device}"


def decide(f: FormatFacts, written: Optional[WrittenCheck] = None) -> Decision:
    """Format or refuse; with ``needs_scan`` the caller reads :func:`sample_extents` and asks again."""
    who = _who(f)
    if not f.blank:
        return Decision(False, f"{who} already carries a signature; it is never formatted")
    if f.multi_attach or f.read_only:
        kind = "multi-attach" if f.multi_attach else "read-only"
        return Decision(False, f"{who} is blank, and a {kind} volume is never formatted")
    if f.from_snapshot:
        return Decision(False, f"{who} was created from a snapshot but shows no filesystem; refusing to format it")
    if f.instance_store:
        return Decision(True, "instance-store scratch with no signature")
    if f.created_empty:
        return Decision(True, "spot-agent created this volume empty")
    if f.policy != IF_NEVER_WRITTEN:
        return Decision(False, f"{who} has no recognisable filesystem and spot-agent did not create it empty; "
                               f"refusing to format it (it may hold data no probe can name; "
                               f"format_existing = \"{IF_NEVER_WRITTEN}\" allows formatting a volume that reads as never written)")
    if written is None:
        return Decision(False, "not read yet", needs_scan=True)
    if written.never_written:
        return Decision(True, f"format_existing = \"{IF_NEVER_WRITTEN}\" and it {written.describe()}")
    return Decision(False, f"{who} has no recognisable filesystem but {written.describe()}; refusing to format it")
