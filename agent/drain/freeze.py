"""sync, fsfreeze, one API call, thaw: the frozen window is exactly the snapshot request.

An EBS snapshot is point-in-time as soon as CreateSnapshot returns, so the filesystem only needs to be
quiet for that call. A frozen filesystem is dangerous: every writer blocks in the kernel and cannot be
killed until thaw. So:

- dirty data is flushed with ``sync -f`` *before* freezing (fsfreeze flushes too, but then inside the
  window);
- the mount point is recorded in the state file *before* ``fsfreeze -f``, and removed only after it was
  thawed; :func:`thaw_leftovers` at startup thaws whatever a killed agent left frozen;
- thaw runs in ``finally``, and the API call runs in a thread with a deadline
  (``[drain] freeze_timeout``): a hung request thaws the filesystem and is awaited unfrozen;
- a filesystem holding the agent's own state directory is never frozen (the state write would hang).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from agent import hostfacts
from agent.drain.crashpoint import crash_point
from agent.runner import Runner
from agent.state import StateStore

log = logging.getLogger(__name__)

SECTION = "drain"
KEY = "frozen"  # state["drain"]["frozen"] = {mountpoint: {"volume": name, "since": epoch, "boot_id": ...}}
COMMAND_TIMEOUT = 10.0


@dataclass
class FrozenCallResult:
    value: Any = None
    frozen_seconds: float = 0.0
    frozen: List[str] = field(default_factory=list)  # mount points that were frozen for the call
    warnings: List[str] = field(default_factory=list)
    in_window: bool = True  # False: the call outlived freeze_timeout and finished after thaw
    freeze_seconds: float = 0.0  # fsfreeze -f itself (it flushes what sync -f left)
    call_seconds: float = 0.0  # the API call while frozen (until thaw began)
    thaw_seconds: float = 0.0


def boot_id() -> str:
    """This boot's id, read through the configured ``[host] proc_root`` (agent.hostfacts)."""
    return hostfacts.default().boot_id()


def _records(state: StateStore) -> Dict[str, Dict[str, Any]]:
    return dict((state.get(SECTION, {}) or {}).get(KEY, {}) or {})


def _set_records(state: StateStore, records: Dict[str, Dict[str, Any]]) -> None:
    state.update(SECTION, **{KEY: records})


def thaw(runner: Runner, mountpoint: str, attempts: int = 3) -> bool:
    """Thaw ``mountpoint``; True when it is thawed now (including "was not frozen")."""
    for attempt in range(attempts):
        res = runner.run(["fsfreeze", "-u", mountpoint], timeout=COMMAND_TIMEOUT, check=False)
        if res.ok or "Invalid argument" in res.stderr:
            return True
        log.error("thaw %s failed (attempt %d): %s", mountpoint, attempt + 1, res.error_line(),
                  extra={"journal": {"MOUNTPOINT": mountpoint}})
        time.sleep(0.1 * (attempt + 1))
    return False


def thaw_leftovers(state: StateStore, runner: Runner, current: Optional[str] = None) -> List[str]:
    """Thaw every filesystem a previous agent process recorded as frozen; returns those thawed.

    Call at startup before anything else, and before any network I/O: writers on a frozen filesystem
    hang in D state until thaw, so it must not wait for IMDS or AWS. (The unit's ExecStopPost=
    runs `spot-agent thaw` too, so a SIGKILLed agent's freeze ends even before it is restarted.)
    Records from another boot are dropped (a reboot thaws everything), as are mount points that are
    no longer mounted. ``current``: this boot's id (default: read from the host).
    """
    records = _records(state)
    if not records:
        return []
    current = boot_id() if current is None else current
    thawed: List[str] = []
    remaining: Dict[str, Dict[str, Any]] = {}
    for mountpoint, rec in records.items():
        if rec.get("boot_id") and current and rec["boot_id"] != current:
            continue
        if not os.path.ismount(mountpoint):
            log.warning("was frozen by a previous run but is no longer mounted: %s", mountpoint)
            continue
        if thaw(runner, mountpoint):
            log.warning("thawed %s, left frozen by a previous agent process", mountpoint,
                        extra={"journal": {"MOUNTPOINT": mountpoint, "VOLUME": rec.get("volume", "")}})
            thawed.append(mountpoint)
        else:
            remaining[mountpoint] = rec
    _set_records(state, remaining)
    return thawed


def holds_path(mountpoint: str, path: str) -> bool:
    """True when ``path`` lives on the filesystem mounted at ``mountpoint``."""
    try:
        return os.stat(mountpoint).st_dev == os.stat(path).st_dev
    except OSError:
        return False


def frozen_call(volumes: List[Tuple[str, str]], call: Callable[[], Any], *, runner: Runner, state: StateStore,
                freeze_timeout: float, budget: float, never_freeze: Optional[str] = None) -> FrozenCallResult:
    """sync and freeze every ``(volume name, mount point)``, run ``call``, thaw in ``finally``.

    ``budget`` bounds the whole thing; ``freeze_timeout`` bounds the frozen window. A filesystem that
    cannot be frozen (or holds ``never_freeze``, the state directory) is snapshotted unfrozen, with a
    warning: crash-consistent beats nothing. Raises whatever ``call`` raised, after thawing.
    """
    started = time.monotonic()
    out = FrozenCallResult()
    targets: List[Tuple[str, str]] = []
    for name, mountpoint in volumes:
        if never_freeze and holds_path(mountpoint, never_freeze):
            out.warnings.append(f"{name}: not frozen, {mountpoint} holds the agent's state directory")
            continue
        targets.append((name, mountpoint))
    for name, mountpoint in targets:
        res = runner.run(["sync", "-f", mountpoint], timeout=max(1.0, budget / 2), check=False)
        if not res.ok:
            out.warnings.append(f"{name}: {res.error_line()}")
    records = _records(state)
    now, bid = time.time(), boot_id()
    for name, mountpoint in targets:
        records[mountpoint] = {"volume": name, "since": now, "boot_id": bid}
    _set_records(state, records)  # before fsfreeze: a SIGKILL from here on leaves a record to thaw
    box: Dict[str, Any] = {}
    worker: Optional[threading.Thread] = None
    t_frozen = t_call = 0.0
    try:
        t_frozen = time.monotonic()
        for name, mountpoint in targets:
            res = runner.run(["fsfreeze", "-f", mountpoint], timeout=COMMAND_TIMEOUT, check=False)
            if res.ok:
                out.frozen.append(mountpoint)
            else:
                out.warnings.append(f"{name}: not frozen: {res.error_line()}")
        t_call = time.monotonic()
        out.freeze_seconds = t_call - t_frozen
        crash_point("frozen")

        def work() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=work, name="snapshot-call", daemon=True)
        worker.start()
        worker.join(min(freeze_timeout, max(0.0, budget - (time.monotonic() - started))))
        if worker.is_alive():
            out.in_window = False
            out.warnings.append(f"CreateSnapshot outlived the {freeze_timeout:g} s freeze window: thawed first, "
                                "the snapshot is crash-consistent only")
        else:
            crash_point("snapshot-call")
    finally:
        t_thaw = time.monotonic()
        out.call_seconds = t_thaw - t_call if t_call else 0.0
        thawed_all = True
        for mountpoint in reversed(out.frozen):
            if not thaw(runner, mountpoint):
                thawed_all = False
                continue
            records.pop(mountpoint, None)
        if out.frozen:
            out.frozen_seconds = time.monotonic() - t_frozen
            out.thaw_seconds = time.monotonic() - t_thaw
        for _, mountpoint in targets:
            if mountpoint not in out.frozen:
                records.pop(mountpoint, None)
        _set_records(state, records)
        if not thawed_all:
            log.critical("could not thaw %s; writers there are blocked", ", ".join(records))
    if worker is not None and worker.is_alive():
        worker.join(max(0.0, budget - (time.monotonic() - started)))
        if worker.is_alive():
            raise TimeoutError(f"CreateSnapshot did not return within the {budget:.1f} s budget")
    if "error" in box:
        raise box["error"]
    out.value = box.get("value")
    return out
