"""The fleet mode: 20 agent processes drain at once against one strict local AWS with small token
buckets, as a mass spot reclaim of 20 instances shares one account's limits.

Every drain must complete its snapshot and its lifecycle action through the throttling, and the
endpoint must see no call from an agent after that agent's deadline. (bench/fleet_drain.py is the same
at bench size, with the numbers in bench/RESULTS.md.)
"""

from __future__ import annotations

from agent.sim.fleet import run_fleet, to_json
from agent.sim.strict import StrictSettings

AGENTS = 20
WINDOW = 40.0


def test_twenty_agents_drain_at_once_through_small_token_buckets(strict_aws, tmp_path):
    server = strict_aws.server
    # small buckets: 20 CreateSnapshot and 20 CompleteLifecycleAction cannot all pass at once
    server.strict.settings = StrictSettings.fast(ec2_intensive_bucket=(4.0, 2.0), ec2_describe_bucket=(5.0, 3.0),
                                                 autoscaling_bucket=(4.0, 2.0))
    from agent.aws import make_clients
    from agent.config import AWSSection
    from agent.sim.localaws import ORACLE_KEY

    oracle = make_clients(AWSSection(endpoint_url=server.url), "us-east-1", credentials=(ORACLE_KEY, "x"))
    result = run_fleet(server, oracle, AGENTS, WINDOW, str(tmp_path), heartbeat_interval=5.0)
    summary = result.summary()
    assert len(result.results) == AGENTS
    bad = [r for r in result.results if not (r.ok and r.snapshot and r.lifecycle_completed)]
    assert not bad, to_json(result)
    assert summary["throttled"] > 0, summary  # the buckets did bite
    assert summary["late_calls"] == 0 and summary["worst_last_call_margin_seconds"] > 0, summary
    assert summary["snapshots"] == AGENTS and summary["lifecycle_completed"] == AGENTS
    # only throttling was met: no heartbeat after the completion ("No active Lifecycle Action"), no
    # second snapshot refused for the per-volume rate
    assert set(summary["refused_by_code"]) <= {f"{a}: {c}" for a in summary["calls_by_action"]
                                                for c in ("RequestLimitExceeded", "Throttling")}, summary
    # the endpoint agrees: one snapshot per volume, every lifecycle action completed (none timed out)
    snaps = oracle.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert sorted(s["SnapshotId"] for s in snaps) == sorted(r.snapshot for r in result.results)
    for r in result.results:
        assert server.strict.lifecycle_state(r.instance_id).how == "completed"
