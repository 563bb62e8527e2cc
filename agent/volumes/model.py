"""What the rest of the agent knows about a volume once it is up (the drain snapshots from this)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class MountedVolume:
    name: str  # the [[volumes]] name
    volume_id: str  # "" for instance-store scratch
    device: str  # /dev/NAME the filesystem lives on (resolved, not a symlink)
    mountpoint: str
    fs: str  # ext4 | xfs
    read_only: bool = False
    multi_attach: bool = False
    snapshot_on_drain: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MountedVolume":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
