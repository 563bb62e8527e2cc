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


def from_imds(client: "IMDSClient") -> InstanceIdentity:  # type: ignore[name-defined]  # noqa: F821
    """Read the identity document (one request), falling back to the individual paths."""
    from agent.imds import parse

    doc_text = client.get_text("/latest/dynamic/instance-identity/document")
    if doc_text:
        try:
            doc = parse.parse_identity_document(doc_text)
            life = client.get_text("/latest/meta-data/instance-life-cycle") or "on-demand"
            return InstanceIdentity(
                instance_id=str(doc.get("instanceId", "")),
                instance_type=str(doc.get("instanceType", "")),
                availability_zone=str(doc.get("availabilityZone", "")),
                region=str(doc.get("region", "")),
                life_cycle=life.strip(),
            )
        except parse.BadAnswer:
            pass
    get = lambda p: (client.get_text(f"/latest/meta-data/{p}") or "").strip()  # noqa: E731
    az = get("placement/availability-zone")
    return InstanceIdentity(
        instance_id=get("instance-id"),
        instance_type=get("instance-type"),
        availability_zone=az,
        region=get("placement/region") or az[:-1],
        life_cycle=get("instance-life-cycle") or "on-demand",
    )
