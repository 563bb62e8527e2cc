"""The watcher against the simulator: every notice kind once, latching, bursts, bad answers."""

import queue
import time

import pytest

from agent import metrics
from agent.config import IMDSSection
from agent.events import ASG_TERMINATION, REBALANCE, SCHEDULED_MAINTENANCE, SPOT_INTERRUPTION
from agent.imds.client import IMDSClient
from agent.watchers.imds import IMDSWatcher


@pytest.fixture
def watch(imds_sim):
    watchers = []

    def start(**kw):
        section = IMDSSection(endpoint=imds_sim.url, poll_interval=kw.pop("poll_interval", 0.1),
                              slow_poll_interval=kw.pop("slow_poll_interval", 0.2), timeout=0.5,
                              backoff_max=kw.pop("backoff_max", 0.4))
        events = queue.Queue()
        w = IMDSWatcher(IMDSClient(imds_sim.url, timeout=0.5), section, **kw)
        w.start(events.put)
        watchers.append(w)
        return w, events

    yield start
    for w in watchers:
        w.stop()


def collect(events, seconds):
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(events.get(timeout=max(0.01, end - time.monotonic())))
        except queue.Empty:
            break
    return out


def wait_for(events, kind, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            e = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if e.kind == kind:
            return e
    raise AssertionError(f"no {kind} event within {timeout}s")


@pytest.mark.parametrize("trigger,kind,action", [
    (("spot", {"action": "terminate", "in": 120}), SPOT_INTERRUPTION, "terminate"),
    (("spot", {"action": "stop", "in": 120}), SPOT_INTERRUPTION, "stop"),
    (("spot", {"action": "hibernate", "in": 0}), SPOT_INTERRUPTION, "hibernate"),
    (("rebalance", {}), REBALANCE, "rebalance"),
    (("scheduled", {"code": "instance-stop", "in": 300}), SCHEDULED_MAINTENANCE, "instance-stop"),
    (("asg", {"state": "Terminated"}), ASG_TERMINATION, "terminate"),
])
def test_each_notice_kind_fires_exactly_once(imds_sim, watch, trigger, kind, action):
    w, events = watch()
    time.sleep(0.3)
    imds_sim.control(*trigger)
    seen = collect(events, 1.5)
    assert [(e.kind, e.action) for e in seen] == [(kind, action)]
    if kind == SPOT_INTERRUPTION:
        assert seen[0].deadline == pytest.approx(imds_sim.state.spot["time"], abs=1.0)


def test_moving_time_fires_once(imds_sim, watch):
    w, events = watch()
    imds_sim.control("spot", {"action": "terminate", "moving_time": True})
    seen = collect(events, 1.5)
    assert len(seen) == 1
    assert w.polls >= 8  # it kept polling while the time moved


def test_asg_in_service_is_nothing(imds_sim, watch):
    w, events = watch()
    imds_sim.control("asg", {"state": "InService"})
    assert collect(events, 0.8) == []


def test_canceled_scheduled_event_cancels(imds_sim, watch):
    w, events = watch()
    eid = imds_sim.control("scheduled", {"code": "instance-retirement", "in": 300})["event_id"]
    first = wait_for(events, SCHEDULED_MAINTENANCE)
    assert not first.cancelled
    imds_sim.control("scheduled", {"code": "instance-retirement", "event_id": eid, "state": "canceled"})
    second = wait_for(events, SCHEDULED_MAINTENANCE)
    assert second.cancelled and second.key == first.key


def test_bursts_of_429_and_500_recover_without_missing_the_notice(imds_sim, watch):
    w, events = watch()
    time.sleep(0.2)
    imds_sim.control("fault", {"kind": "429", "count": 6})
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    e = wait_for(events, SPOT_INTERRUPTION, timeout=8)
    assert e.action == "terminate"
    imds_sim.control("fault", {"kind": "5xx", "count": 6})
    imds_sim.control("rebalance", {})
    assert wait_for(events, REBALANCE, timeout=8)
    assert collect(events, 0.5) == []  # nothing duplicated
    assert imds_sim.state.fault_429 == 0 and imds_sim.state.fault_5xx == 0


def test_backoff_does_not_spin(imds_sim, watch):
    w, events = watch(backoff_max=0.4)
    imds_sim.control("fault", {"kind": "5xx", "count": -1})
    imds_sim.state.fault_5xx = 10**9
    time.sleep(2.0)
    # Polling at 0.1 s would be ~20+ requests; the backoff (capped at 0.4 s, half jittered) keeps it lower.
    assert w.polls < 15
    assert w.backoff.failing


@pytest.mark.parametrize("body,reason", [
    ("{not json", "malformed-json"),
    ('{"action": "explode", "time": "2030-01-01T00:00:00Z"}', "unknown-action"),
    ("", "empty"),
    ("<html><body>captive portal</body></html>", "html"),
])
def test_bad_answers_are_counted_and_survived(imds_sim, watch, body, reason):
    before = metrics.REGISTRY.get_sample_value("spot_agent_imds_bad_answers_total",
                                               {"path": "spot/instance-action", "reason": reason}) or 0
    w, events = watch()
    imds_sim.control("fault", {"kind": "malformed", "path": "spot/instance-action", "body": body, "count": 3})
    time.sleep(0.8)
    assert collect(events, 0.1) == []
    after = metrics.REGISTRY.get_sample_value("spot_agent_imds_bad_answers_total",
                                              {"path": "spot/instance-action", "reason": reason})
    assert after - before == 3
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_for(events, SPOT_INTERRUPTION).action == "terminate"
    assert w.alive()


def test_answer_that_never_ends(imds_sim, watch):
    w, events = watch()
    time.sleep(0.2)
    imds_sim.control("fault", {"kind": "hang", "count": 2})
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_for(events, SPOT_INTERRUPTION, timeout=6)
    assert w.alive()


def test_403_reports_disabled_and_recovers(imds_sim, watch, monkeypatch):
    import agent.watchers.imds as mod

    monkeypatch.setattr(mod, "DISABLED_RECHECK", 0.3)
    health = []
    w, events = watch(on_health=health.append)
    time.sleep(0.3)
    imds_sim.control("fault", {"kind": "403"})
    time.sleep(0.5)
    assert w.disabled and any(h["disabled"] for h in health)
    assert metrics.REGISTRY.get_sample_value("spot_agent_imds_disabled") == 1
    imds_sim.control("fault", {"kind": "403", "on": False})
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_for(events, SPOT_INTERRUPTION)
    assert not w.disabled


def test_token_expiry_mid_run(imds_sim, watch):
    w, events = watch()
    time.sleep(0.3)
    imds_sim.control("fault", {"kind": "token-expiry"})
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_for(events, SPOT_INTERRUPTION)
    assert imds_sim.state.requests_by_path["/latest/api/token"] == 2
    assert imds_sim.state.max_token_headers == 1


def test_a_reloaded_interval_applies_at_once(imds_sim, watch):
    w, events = watch(poll_interval=2.0, slow_poll_interval=5.0)
    time.sleep(1.0)
    before = imds_sim.state.requests_by_path.get("/latest/meta-data/spot/instance-action", 0)
    w.section.poll_interval = 0.1  # what the daemon's reload does
    time.sleep(2.5)
    after = imds_sim.state.requests_by_path.get("/latest/meta-data/spot/instance-action", 0)
    assert after - before >= 10


def test_headers_that_trickle_do_not_block_the_watcher(imds_sim, watch):
    w, events = watch()
    time.sleep(0.2)
    imds_sim.control("fault", {"kind": "slow-headers", "count": 2, "seconds": 0.05})
    imds_sim.control("spot", {"action": "terminate", "in": 120})
    assert wait_for(events, SPOT_INTERRUPTION, timeout=6)
    assert w.alive()


@pytest.mark.parametrize("bad_time", ['"whenever"', "12345", "null", '"2030-13-45T00:00:00Z"'])
def test_spot_notice_with_a_bad_time_drains_with_two_minutes(imds_sim, watch, bad_time):
    """Fail safe: the action is clear, so the notice counts, with the standard two minutes from when
    it was first seen; the bad time is still counted and logged as a bad answer."""
    labels = {"path": "spot/instance-action", "reason": "bad-time"}
    before = metrics.REGISTRY.get_sample_value("spot_agent_imds_bad_answers_total", labels) or 0
    body = '{"action": "stop", "time": %s}' % bad_time
    imds_sim.control("fault", {"kind": "malformed", "path": "spot/instance-action", "body": body, "count": -1})
    seen = time.time()
    w, events = watch()
    e = wait_for(events, SPOT_INTERRUPTION)
    assert e.action == "stop" and e.key == "spot:stop"
    assert seen <= e.detected_at <= time.time()
    assert e.deadline == pytest.approx(e.detected_at + 120, abs=0.01)
    time.sleep(0.5)
    assert collect(events, 0.1) == []  # latched: once, and the deadline does not move with each poll
    assert w.tracker.active["spot:stop"].deadline == e.deadline
    after = metrics.REGISTRY.get_sample_value("spot_agent_imds_bad_answers_total", labels)
    assert after - before >= 2


def test_nul_in_a_scheduled_event_is_escaped_counted_and_still_an_event(imds_sim, watch):
    """A NUL cannot reach a hook's environment (exec refuses it and the hook silently did not run):
    the field arrives escaped as \\x00, counted once per event in spot_agent_imds_nul_fields_total."""
    import json

    labels = {"path": "events/maintenance/scheduled"}
    before = metrics.REGISTRY.get_sample_value("spot_agent_imds_nul_fields_total", labels) or 0
    body = json.dumps([{"Code": "instance-stop\u0000; rm -rf /", "EventId": "instance-event-nul\u0000",
                        "NotBefore": "21 Jan 2030 09:00:43 GMT", "State": "active", "Description": "ok"}])
    imds_sim.control("fault", {"kind": "malformed", "path": "events/maintenance/scheduled", "body": body, "count": -1})
    w, events = watch()
    e = wait_for(events, SCHEDULED_MAINTENANCE)
    assert e.action == "instance-stop\\x00; rm -rf /" and "\x00" not in e.action
    assert e.key == "scheduled:instance-event-nul\\x00"
    time.sleep(0.6)  # several more polls of the same answer
    after = metrics.REGISTRY.get_sample_value("spot_agent_imds_nul_fields_total", labels)
    assert after - before == 2  # Code and EventId, counted once
