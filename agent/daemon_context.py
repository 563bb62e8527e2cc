"""Everything an action needs, built once at startup: config, identity, AWS clients, state, runner.

Building it is the slow part (IMDS identity, boto3 client construction), so it happens before READY;
after a notice, actions only use what is here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from agent.aws import Clients, make_clients
from agent.backoff import Backoff
from agent.clock import SYSTEM_CLOCK, Clock
from agent.config import Config
from agent.identity import InstanceIdentity, from_imds
from agent.imds.client import IMDSClient, IMDSDisabled, IMDSError
from agent.runner import Runner
from agent.state import StateStore, secure_dir
from agent.systemd_notify import Notifier

log = logging.getLogger(__name__)

UNKNOWN_IDENTITY = InstanceIdentity("", "", "", "", "")


@dataclass
class Context:
    config: Config
    imds: IMDSClient
    identity: InstanceIdentity
    clients: Optional[Clients]
    state: StateStore
    runner: Runner
    clock: Clock
    notifier: Notifier = field(default_factory=Notifier)
    imds_disabled: bool = False

    @property
    def run_name(self) -> str:
        return self.config.agent.run or self.identity.instance_id


def make_imds_client(config: Config, clock: Clock = SYSTEM_CLOCK) -> IMDSClient:
    s = config.imds
    return IMDSClient(s.endpoint, timeout=s.timeout, token_ttl=s.token_ttl, allow_imdsv1=s.allow_imdsv1, clock=clock)


def fetch_identity(client: IMDSClient, clock: Clock = SYSTEM_CLOCK, attempts: int = 0,
                   notifier: Optional[Notifier] = None) -> InstanceIdentity:
    """Identity from IMDS, retrying transient errors with backoff (``attempts`` 0: until it answers).

    Raises IMDSDisabled at once: retrying a 403 cannot help.
    """
    backoff = Backoff(base=0.25, cap=5.0)
    tries = 0
    while True:
        tries += 1
        try:
            return from_imds(client)
        except IMDSError as exc:
            if attempts and tries >= attempts:
                raise
            delay = backoff.next_delay()
            log.warning("IMDS not answering yet (%s); retrying in %.1fs", exc, delay)
            if notifier is not None:
                notifier.status(f"waiting for IMDS: {exc}")
                notifier.extend_timeout(delay + 30)
            clock.sleep(delay)


def build_context(config: Config, clock: Clock = SYSTEM_CLOCK, notifier: Optional[Notifier] = None,
                  identity_attempts: int = 0, state: Optional[StateStore] = None) -> Context:
    """Build the context. An IMDS that answers 403 leaves the identity unknown but does not fail:
    the agent can still drain on SIGTERM and upload checkpoints. ``state``: the store the caller
    already opened (the daemon thaws from it before any network I/O)."""
    notifier = notifier or Notifier()
    secure_dir(config.agent.state_dir)  # a user-writable state dir could plant drain records
    if state is None:
        state = StateStore(os.path.join(config.agent.state_dir, "state.json"))
    imds = make_imds_client(config, clock)
    disabled = False
    try:
        identity = fetch_identity(imds, clock, identity_attempts, notifier)
    except IMDSDisabled as exc:
        log.error("%s; the instance identity is unknown and no notices can be seen", exc)
        identity = UNKNOWN_IDENTITY
        disabled = True
    region = config.aws.region or identity.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")
    clients = make_clients(config.aws, region, max_pool=max(32, config.transfer.concurrency + 8)) if region else None
    if clients is None:
        log.warning("no AWS region (aws.region empty and IMDS gave none): AWS actions are off")
    return Context(config=config, imds=imds, identity=identity, clients=clients, state=state,
                   runner=Runner(), clock=clock, notifier=notifier, imds_disabled=disabled)
