"""Suite-wide rules: skipped tests fail the run, and nothing may reach the real IMDS address."""

from __future__ import annotations

import os

import pytest

# botocore's credential chain would otherwise ask 169.254.169.254; tests set endpoints explicitly.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get("SPOT_AGENT_ALLOW_SKIPS") != "1":
        reporter.write_line(f"FAILED: {skipped} test(s) skipped; skips count as failures here", red=True)
        session.exitstatus = 1


@pytest.fixture(scope="session")
def local_aws():
    """One moto server on 127.0.0.1 for the session (with our Auto Scaling lifecycle extensions)."""
    from agent.sim.localaws import LocalAWS

    server = LocalAWS().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def strict_local_aws():
    """One strict local AWS (agent.sim.strict, on the demo's shorter time scale) for the session."""
    from agent.sim.localaws import LocalAWS
    from agent.sim.strict import StrictSettings

    server = LocalAWS(strict=True, settings=StrictSettings.fast()).start()
    yield server
    server.stop()


@pytest.fixture
def strict_aws(strict_local_aws):
    """Fresh state on the strict local AWS (default fast settings again), and clients pointed at it."""
    from agent.aws import make_clients
    from agent.config import AWSSection
    from agent.sim.strict import StrictSettings

    strict_local_aws.reset()
    strict_local_aws.strict.settings = StrictSettings.fast()
    clients = make_clients(AWSSection(endpoint_url=strict_local_aws.url), "us-east-1")
    clients.url = strict_local_aws.url  # type: ignore[attr-defined]
    clients.server = strict_local_aws  # type: ignore[attr-defined]
    return clients


@pytest.fixture
def aws(local_aws):
    """Fresh AWS state per test, and boto3 clients pointed at it."""
    from agent.aws import make_clients
    from agent.config import AWSSection

    local_aws.reset()
    clients = make_clients(AWSSection(endpoint_url=local_aws.url), "us-east-1")
    clients.url = local_aws.url  # type: ignore[attr-defined]
    return clients


@pytest.fixture
def imds_sim():
    """The project's IMDS simulator on a free loopback port, fresh per test."""
    from agent.sim.imds_server import IMDSSimulator

    sim = IMDSSimulator("127.0.0.1", 0).start()
    yield sim
    sim.stop()
