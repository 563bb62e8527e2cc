"""The fleet side without AWS: the launch hook's once-per-boot answers and the rebalance clock
(stand-ins for Auto Scaling; the real daemon against moto is in tests/integration/test_launch_hook.py)."""

from __future__ import annotations

import time

from agent import metrics
from agent.config import FleetSection
from agent.fleet import LaunchHook, RebalanceTracker
from agent.state import StateStore


class Clock:
    def __init__(self, now=1_900_000_000.0):
        self.now = now

    def time(self):
        return self.now


class FakeAutoScaling:
    def __init__(self, hooks=("launch",), fail_complete=None):
        self.hooks = hooks
        self.calls = []
        self.fail_complete = fail_complete

    def describe_auto_scaling_instances(self, InstanceIds):  # noqa: N803 - boto3's names
        return {"AutoScalingInstances": [{"InstanceId": InstanceIds[0], "AutoScalingGroupName": "grp"}]}

    def describe_lifecycle_hooks(self, AutoScalingGroupName):  # noqa: N803
        return {"LifecycleHooks": [{"LifecycleHookName": h, "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING"}
                                   for h in self.hooks]
                + [{"LifecycleHookName": "term", "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}]}

    def record_lifecycle_action_heartbeat(self, **kw):
        self.calls.append(("beat", kw["LifecycleHookName"]))

    def complete_lifecycle_action(self, **kw):
        if self.fail_complete:
            raise RuntimeError(self.fail_complete)
        self.calls.append(("complete", kw["LifecycleHookName"], kw["LifecycleActionResult"]))


def test_launch_hook_heartbeats_then_continues_once_per_boot(tmp_path):
    asg = FakeAutoScaling()
    state = StateStore(str(tmp_path / "s.json"))
    hook = LaunchHook(FleetSection(launch_heartbeat_interval=1.0), "", asg, "i-1", state).start()
    hook._thread.join(5)  # discovery runs in the background (READY never waits for Auto Scaling)
    assert hook.target is not None and hook.target.hook == "launch"
    time.sleep(0.1)
    assert ("beat", "launch") in asg.calls
    assert hook.finish("CONTINUE") is True and hook.finish("ABANDON") is False
    assert [c for c in asg.calls if c[0] == "complete"] == [("complete", "launch", "CONTINUE")]
    # a restarted agent in the same boot does not answer again
    again = LaunchHook(FleetSection(), "", asg, "i-1", state).start()
    assert again.finish("CONTINUE") is False
    assert len([c for c in asg.calls if c[0] == "complete"]) == 1


def test_no_launch_hook_or_turned_off_does_nothing(tmp_path):
    state = StateStore(str(tmp_path / "s.json"))
    asg = FakeAutoScaling(hooks=())
    assert LaunchHook(FleetSection(), "", asg, "i-1", state).start().finish("CONTINUE") is False
    asg2 = FakeAutoScaling()
    assert LaunchHook(FleetSection(launch_lifecycle=False), "", asg2, "i-1", state).start().finish("ABANDON") is False
    assert asg.calls == [] and asg2.calls == []


def test_no_active_action_is_not_an_error(tmp_path):
    asg = FakeAutoScaling(fail_complete="ValidationError: No active Lifecycle Action found with instance ID i-1")
    hook = LaunchHook(FleetSection(), "", asg, "i-1", StateStore(str(tmp_path / "s.json"))).start()
    assert hook.finish("CONTINUE") is False


def sample(name, **labels):
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


def test_rebalance_then_interruption_observes_the_lead_time(tmp_path):
    clock = Clock()
    t = RebalanceTracker(StateStore(str(tmp_path / "s.json")), clock, 3600)
    before = sample("spot_agent_rebalance_outcomes_total", outcome="interrupted")
    count = sample("spot_agent_rebalance_to_interruption_seconds_count")
    t.rebalance()
    clock.now += 300
    t.rebalance()  # a second recommendation is the same episode
    clock.now += 120
    assert t.interrupted("shutdown") is None  # an OS shutdown is not an interruption
    assert t.interrupted("spot-interruption") == 420
    assert t.interrupted("spot-interruption") is None
    assert sample("spot_agent_rebalance_outcomes_total", outcome="interrupted") == before + 1
    assert sample("spot_agent_rebalance_to_interruption_seconds_count") == count + 1
    t.close()


def test_rebalance_with_nothing_following_counts_none_followed_and_survives_a_restart(tmp_path):
    clock = Clock()
    path = str(tmp_path / "s.json")
    before = sample("spot_agent_rebalance_outcomes_total", outcome="none_followed")
    t = RebalanceTracker(StateStore(path), clock, 3600)
    t.rebalance()
    t.close()  # the agent restarts
    clock.now += 4000
    t2 = RebalanceTracker(StateStore(path), clock, 3600)  # past the window: expires at once
    end = time.monotonic() + 2
    while time.monotonic() < end and sample("spot_agent_rebalance_outcomes_total", outcome="none_followed") == before:
        time.sleep(0.02)
    assert sample("spot_agent_rebalance_outcomes_total", outcome="none_followed") == before + 1
    assert t2.interrupted("spot-interruption") is None
    t2.close()


def test_an_unreachable_auto_scaling_never_delays_startup(tmp_path):
    class Hanging(FakeAutoScaling):
        def describe_auto_scaling_instances(self, InstanceIds):  # noqa: N803
            time.sleep(3)
            raise ConnectionError("unreachable")

    t0 = time.monotonic()
    hook = LaunchHook(FleetSection(), "", Hanging(), "i-1", StateStore(str(tmp_path / "s.json"))).start()
    assert time.monotonic() - t0 < 1.0
    assert hook.finish("ABANDON", wait=0.1) is False and time.monotonic() - t0 < 2.0
