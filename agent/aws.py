"""AWS clients, built once at startup so the drain's hot path never constructs or discovers anything.

Two of each EC2/Auto Scaling client: the boot-path ones keep botocore's retries (``[aws]
max_attempts``); the drain's make one attempt per call and are retried by :class:`Budgeted`, which
waits (jittered) through throttling and retryable state errors for as long as the step's budget
lasts and never starts a call after it. botocore's fixed attempts with their own sleeps could run a
drain past its deadline on an account busy with a mass reclaim, and botocore does not retry EC2's
per-volume snapshot limit at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple

from agent.backoff import Backoff, retry_until
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import AWSSection

log = logging.getLogger(__name__)

# The request was refused before anything happened: always safe to send again.
THROTTLING = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled",
                        "RequestThrottledException", "TooManyRequestsException", "EC2ThrottledException",
                        "SlowDown", "PriorRequestNotComplete"})
# Refused for now; fine later (seconds to wait at least).
LIMITS = {"SnapshotCreationPerVolumeRateExceeded": 1.0, "ConcurrentSnapshotLimitExceeded": 2.0,
          "IncorrectState": 0.5, "IncorrectInstanceState": 0.5}
# Maybe done, maybe not: retried only for calls that are safe to repeat.
SERVER = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})
# Calls that are not safe to repeat blindly after an ambiguous failure (no idempotency token): the
# caller looks for the result by tag instead.
NOT_IDEMPOTENT = frozenset({"create_snapshot", "create_snapshots", "copy_snapshot"})


def error_code(exc: BaseException) -> str:
    return str((getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "") or "")


def _http_status(exc: BaseException) -> int:
    meta = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {}) or {}
    try:
        return int(meta.get("HTTPStatusCode") or 0)
    except (TypeError, ValueError):
        return 0


def retry_after(exc: BaseException, idempotent: bool = True) -> Optional[float]:
    """None: do not retry ``exc``; else the least seconds to wait before the next try."""
    code = error_code(exc)
    if code in THROTTLING:
        return 0.0
    if code in LIMITS:
        return LIMITS[code]
    if not idempotent:
        return None
    if code in SERVER or (not code and _http_status(exc) >= 500):
        return 0.0
    if not code and _is_connection_error(exc):
        return 0.0
    return None


def _is_connection_error(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - botocore is a dependency
        return False
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


@dataclass
class RetryStats:
    calls: int = 0
    retries: int = 0
    by_code: Dict[str, int] = field(default_factory=dict)


class Budgeted:
    """``client`` whose calls retry (jittered backoff, :func:`agent.backoff.retry_until`) until
    ``deadline`` (monotonic seconds of ``clock``). Attribute access gives the wrapped client's methods."""

    def __init__(self, client: Any, deadline: float, clock: Clock = SYSTEM_CLOCK, what: str = "",
                 rand: Optional[Callable[[], float]] = None, stats: Optional[RetryStats] = None) -> None:
        self._client = client
        self.deadline = deadline
        self._clock = clock
        self._what = what
        self._rand = rand
        self.stats = stats or RetryStats()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method) or name.startswith("_") or name in ("get_paginator", "get_waiter", "can_paginate"):
            return method
        idempotent = name not in NOT_IDEMPOTENT

        def call(*args: Any, **kwargs: Any) -> Any:
            def once() -> Any:
                self.stats.calls += 1
                return method(*args, **kwargs)

            def retried(exc: BaseException, delay: float) -> None:
                code = error_code(exc) or type(exc).__name__
                self.stats.retries += 1
                self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
                log.info("%s%s: %s, retrying in %.2f s", f"{self._what}: " if self._what else "", name, code, delay)

            return retry_until(once, deadline=self.deadline, clock=self._clock, what=f"{self._what or 'aws'} {name}",
                               retry_after=lambda exc: retry_after(exc, idempotent),
                               backoff=Backoff(base=0.2, cap=4.0, rand=self._rand), on_retry=retried)

        return call


@dataclass
class Clients:
    ec2: Any
    s3: Any
    autoscaling: Any
    region: str
    drain_ec2: Any = None  # one attempt per call: wrapped by :meth:`budgeted` on the drain path
    drain_autoscaling: Any = None

    def budgeted(self, seconds: float, clock: Clock = SYSTEM_CLOCK, what: str = "",
                 stats: Optional[RetryStats] = None) -> "Clients":
        """These clients with EC2 and Auto Scaling calls retried for at most ``seconds`` from now."""
        deadline = clock.monotonic() + max(0.0, seconds)
        stats = stats or RetryStats()
        return replace(self, ec2=Budgeted(self.drain_ec2 or self.ec2, deadline, clock, what, stats=stats),
                       autoscaling=Budgeted(self.drain_autoscaling or self.autoscaling, deadline, clock, what, stats=stats))


def endpoint_for(section: AWSSection, service: str) -> Optional[str]:
    return section.endpoints.get(service) or section.endpoint_url or None


def make_clients(section: AWSSection, region: str, max_pool: int = 32,
                 credentials: Optional[Tuple[str, str]] = None,
                 services: Tuple[str, ...] = ("ec2", "s3", "autoscaling", "drain_ec2", "drain_autoscaling")) -> Clients:
    """Create the clients (``services``: which; the others are None). ``region`` comes from config or IMDS.

    boto3 sessions are not thread-safe to create clients from, but clients are thread-safe to use; one
    session here, clients shared by every action. The connection pool is sized for parallel transfers.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    session = boto3.session.Session(region_name=region or None, **keys)
    cfg = BotoConfig(
        retries={"max_attempts": section.max_attempts, "mode": "standard"},
        max_pool_connections=max_pool,
        connect_timeout=5,
        read_timeout=30,
    )
    once = cfg.merge(BotoConfig(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20))
    s3cfg = cfg.merge(BotoConfig(s3={"addressing_style": "path"} if endpoint_for(section, "s3") else {}))
    specs = {"ec2": ("ec2", cfg), "s3": ("s3", s3cfg), "autoscaling": ("autoscaling", cfg),
             "drain_ec2": ("ec2", once), "drain_autoscaling": ("autoscaling", once)}
    made = {name: session.client(specs[name][0], endpoint_url=endpoint_for(section, specs[name][0]), config=specs[name][1])
            for name in services}
    return Clients(ec2=made.get("ec2"), s3=made.get("s3"), autoscaling=made.get("autoscaling"), region=region,
                   drain_ec2=made.get("drain_ec2"), drain_autoscaling=made.get("drain_autoscaling"))
