"""AWS clients, built once at startup so the drain's hot path never constructs or discovers anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from agent.config import AWSSection


@dataclass
class Clients:
    ec2: Any
    s3: Any
    autoscaling: Any
    region: str


def endpoint_for(section: AWSSection, service: str) -> Optional[str]:
    return section.endpoints.get(service) or section.endpoint_url or None


def make_clients(section: AWSSection, region: str, max_pool: int = 32) -> Clients:
    """Create the three clients. ``region`` comes from config or IMDS.

    boto3 sessions are not thread-safe to create clients from, but clients are thread-safe to use; one
    session here, clients shared by every action. The connection pool is sized for parallel transfers.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    session = boto3.session.Session(region_name=region or None)
    cfg = BotoConfig(
        retries={"max_attempts": section.max_attempts, "mode": "standard"},
        max_pool_connections=max_pool,
        connect_timeout=5,
        read_timeout=30,
    )
    s3cfg = cfg.merge(BotoConfig(s3={"addressing_style": "path"} if endpoint_for(section, "s3") else {}))
    return Clients(
        ec2=session.client("ec2", endpoint_url=endpoint_for(section, "ec2"), config=cfg),
        s3=session.client("s3", endpoint_url=endpoint_for(section, "s3"), config=s3cfg),
        autoscaling=session.client("autoscaling", endpoint_url=endpoint_for(section, "autoscaling"), config=cfg),
        region=region,
    )
