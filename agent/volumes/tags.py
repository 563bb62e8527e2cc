"""Ownership tags: the only thing gc trusts. Every volume and snapshot spot-agent creates carries them."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

MANAGED = "spot-agent:managed"
INSTANCE_ID = "spot-agent:instance-id"
VOLUME_NAME = "spot-agent:volume-name"
DRAIN_VOLUME = "spot-agent:volume"  # the drain's snapshots name their [[volumes]] entry with this key
SOURCE = "spot-agent:source"  # digest of the [[volumes]] source it was made for (see manager._source_key)
PURPOSE = "spot-agent:purpose"  # "volume", "copy-across-az", "checkpoint" (the drain's snapshots)
CREATE_NONCE = "spot-agent:create-nonce"  # random per CreateVolume, also in the state: proves "this call made it"


def ownership(instance_id: str, volume_name: str, purpose: str = "") -> Dict[str, str]:
    tags = {MANAGED: "true", INSTANCE_ID: instance_id, VOLUME_NAME: volume_name}
    if purpose:
        tags[PURPOSE] = purpose
    return tags


def tag_specs(resource_type: str, tags: Dict[str, str]) -> List[Dict[str, Any]]:
    """TagSpecifications for a create call: tags at creation, so nothing exists untagged even briefly."""
    return [{"ResourceType": resource_type, "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())]}]


def as_dict(tag_list: Iterable[Dict[str, str]] | None) -> Dict[str, str]:
    return {t["Key"]: t["Value"] for t in (tag_list or [])}


def volume_name(tags: Dict[str, str]) -> str:
    return tags.get(VOLUME_NAME) or tags.get(DRAIN_VOLUME, "")


def is_managed(tags: Dict[str, str]) -> bool:
    return tags.get(MANAGED) == "true"


def filters(tags: Dict[str, str]) -> List[Dict[str, Any]]:
    return [{"Name": f"tag:{k}", "Values": [v]} for k, v in sorted(tags.items())]
