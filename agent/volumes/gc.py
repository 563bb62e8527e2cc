"""Find (and on request delete) the volumes and snapshots spot-agent left behind.

Rules, in order of precedence:
  - only resources tagged ``spot-agent:managed = true`` are ever considered;
  - the newest completed snapshot of each volume name is always kept;
  - snapshots in progress are kept;
  - volumes the config still finds (its volume_id, or matching its tags) and volumes made for a tags
    source (purpose ``persistent``) are kept: the next instance will attach them;
  - an available volume whose owner instance is gone is an orphan;
  - a snapshot beyond the newest ``keep_last`` completed ones of its volume name, or older than
    ``max_age_days``, goes; so does a failed one, and an across-AZ copy's intermediate snapshot once
    its instance is gone.
A snapshot whose instance is gone is otherwise *not* an orphan: outliving the instance is what a
checkpoint snapshot is for (keying on "instance gone" or "source volume gone" would delete them all).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Set

from agent.volumes import tags as T


@dataclass(frozen=True)
class Retention:
    keep_last: int = 5  # completed snapshots kept per volume name (at least 1 is always kept)
    max_age_days: float = 0.0  # 0: no age limit


@dataclass(frozen=True)
class GcItem:
    kind: str  # "volume" | "snapshot"
    id: str
    volume_name: str
    action: str  # "delete" | "keep"
    reason: str
    state: str = ""
    size_gib: int = 0
    created: str = ""
    instance_id: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _when(value: Any) -> Optional[dt.datetime]:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, str) and value:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
        except ValueError:
            return None
    return None


def _iso(value: Any) -> str:
    when = _when(value)
    return when.isoformat() if when else ""


def plan(volumes: Iterable[Dict[str, Any]], snapshots: Iterable[Dict[str, Any]], live_instances: Set[str],
         retention: Retention, now: dt.datetime, protected_volume_ids: Set[str] = frozenset(),
         protected_tag_sets: Iterable[Dict[str, str]] = ()) -> List[GcItem]:
    """Decide for every managed volume and snapshot. Pure: the describe results come in as data."""
    protected_sets = [dict(t) for t in protected_tag_sets if t]
    items: List[GcItem] = []
    for v in volumes:
        tags = T.as_dict(v.get("Tags"))
        if not T.is_managed(tags):
            continue
        owner = tags.get(T.INSTANCE_ID, "")
        common = dict(kind="volume", id=v["VolumeId"], volume_name=T.volume_name(tags), state=v.get("State", ""),
                      size_gib=int(v.get("Size") or 0), created=_iso(v.get("CreateTime")), instance_id=owner)
        if v.get("State") != "available":
            items.append(GcItem(action="keep", reason=f"{v.get('State')}", **common))
        elif v["VolumeId"] in protected_volume_ids:
            items.append(GcItem(action="keep", reason="named by volume_id in the config", **common))
        elif any(all(tags.get(k) == val for k, val in s.items()) for s in protected_sets):
            items.append(GcItem(action="keep", reason="matches the tags of a [[volumes]] source in the config", **common))
        elif tags.get(T.PURPOSE) == "persistent":
            items.append(GcItem(action="keep", reason="persistent volume of a tags source (the next instance attaches it)", **common))
        elif owner and owner in live_instances:
            items.append(GcItem(action="keep", reason=f"owner {owner} is still running", **common))
        else:
            who = f"owner {owner} is gone" if owner else "no owner instance tag"
            items.append(GcItem(action="delete", reason=f"available and {who}", **common))

    groups: Dict[str, List[Dict[str, Any]]] = {}
    for s in snapshots:
        tags = T.as_dict(s.get("Tags"))
        if not T.is_managed(tags):
            continue
        key = T.volume_name(tags) or f"volume {s.get('VolumeId', '?')}"
        groups.setdefault(key, []).append(s)
    max_age = dt.timedelta(days=retention.max_age_days) if retention.max_age_days > 0 else None
    keep_last = max(1, retention.keep_last)
    for name, snaps in sorted(groups.items()):
        epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
        ordered = sorted(snaps, key=lambda s: (_when(s.get("StartTime")) or epoch, s["SnapshotId"]), reverse=True)
        completed_rank = 0
        for s in ordered:
            tags = T.as_dict(s.get("Tags"))
            owner = tags.get(T.INSTANCE_ID, "")
            state = s.get("State", "")
            started = _when(s.get("StartTime"))
            common = dict(kind="snapshot", id=s["SnapshotId"], volume_name=T.volume_name(tags), state=state,
                          size_gib=int(s.get("VolumeSize") or 0), created=_iso(s.get("StartTime")), instance_id=owner)
            gone = bool(owner) and owner not in live_instances
            note = f"; owner {owner} is gone" if gone else ""
            if state == "completed":
                completed_rank += 1
                if completed_rank == 1:
                    items.append(GcItem(action="keep", reason=f"newest completed snapshot of {name}{note}", **common))
                elif tags.get(T.PURPOSE) == "copy-across-az" and gone:
                    items.append(GcItem(action="delete", reason=f"intermediate across-AZ copy{note}", **common))
                elif completed_rank > keep_last:
                    items.append(GcItem(action="delete", reason=f"beyond the newest {keep_last} of {name}{note}", **common))
                elif max_age is not None and started is not None and now - started > max_age:
                    age = (now - started).total_seconds() / 86400
                    items.append(GcItem(action="delete", reason=f"{age:.1f} days old, over max age {retention.max_age_days:g}{note}", **common))
                else:
                    items.append(GcItem(action="keep", reason=f"within the newest {keep_last} of {name}{note}", **common))
            elif state == "error":
                items.append(GcItem(action="delete", reason=f"snapshot failed (state error){note}", **common))
            else:
                items.append(GcItem(action="keep", reason=f"{state}: in progress{note}", **common))
    return items


# ---- the AWS edge -------------------------------------------------------------------------------


def _paged(call: Any, key: str, **kwargs: Any) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []
    while True:
        page = call(**kwargs)
        out.extend(page.get(key, []))
        token = page.get("NextToken")
        if not token:
            return out
        kwargs["NextToken"] = token


def collect(ec2: Any) -> Dict[str, Any]:
    """Our resources (filtered by the ownership tag server-side; ``plan`` checks it again)."""
    managed = [{"Name": f"tag:{T.MANAGED}", "Values": ["true"]}]
    volumes = _paged(ec2.describe_volumes, "Volumes", Filters=managed)
    snapshots = _paged(ec2.describe_snapshots, "Snapshots", Filters=managed, OwnerIds=["self"])
    owners = sorted({T.as_dict(r.get("Tags")).get(T.INSTANCE_ID, "") for r in volumes + snapshots} - {""})
    live: Set[str] = set()
    for i in range(0, len(owners), 100):
        for r in _paged(ec2.describe_instances, "Reservations",
                        Filters=[{"Name": "instance-id", "Values": owners[i:i + 100]}]):
            for inst in r.get("Instances", []):
                if inst.get("State", {}).get("Name") not in ("shutting-down", "terminated"):
                    live.add(inst["InstanceId"])
    return {"volumes": volumes, "snapshots": snapshots, "live": live}


def delete(ec2: Any, items: List[GcItem]) -> List[Dict[str, Any]]:
    """Delete the items planned for deletion; one failure never stops the rest."""
    out = []
    for item in items:
        if item.action != "delete":
            continue
        try:
            if item.kind == "volume":
                ec2.delete_volume(VolumeId=item.id)
            else:
                ec2.delete_snapshot(SnapshotId=item.id)
            out.append({"id": item.id, "deleted": True, "error": ""})
        except Exception as exc:  # noqa: BLE001
            out.append({"id": item.id, "deleted": False, "error": str(exc)})
    return out
