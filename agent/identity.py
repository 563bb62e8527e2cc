"""Who and where this instance is. Read from IMDS once at startup; every action takes it as given."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class InstanceIdentity:
    instance_id: str
    instance_type: str
    availability_zone: str
    region: str
    life_cycle: str = "spot"  # spot | on-demand

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
