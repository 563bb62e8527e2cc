from agent.events import ASG_TERMINATION, REBALANCE, SCHEDULED_MAINTENANCE, SPOT_INTERRUPTION
from agent.imds.parse import RebalanceNotice, ScheduledEvent, SpotNotice
from agent.notices import NoticeTracker, scheduled_is_due

NOW = 1_700_000_000.0


def test_spot_notice_fires_once_even_when_time_moves():
    t = NoticeTracker()
    first = t.spot(SpotNotice("terminate", NOW + 120), NOW)
    assert [e.kind for e in first] == [SPOT_INTERRUPTION]
    assert first[0].deadline == NOW + 120
    for i in range(1, 5):
        assert t.spot(SpotNotice("terminate", NOW + 120 + i), NOW + i) == []
    assert t.spot(None, NOW + 10) == []  # a 404 after the notice does not un-fire or re-fire it
    assert t.spot(SpotNotice("terminate", NOW + 200), NOW + 11) == []


def test_spot_action_change_is_a_new_notice():
    t = NoticeTracker()
    assert len(t.spot(SpotNotice("stop", NOW + 120), NOW)) == 1
    assert len(t.spot(SpotNotice("terminate", NOW + 120), NOW)) == 1


def test_hibernate_in_the_past_means_now():
    (e,) = NoticeTracker().spot(SpotNotice("hibernate", NOW - 30), NOW)
    assert e.deadline == NOW


def test_spot_notice_with_a_bad_time_gets_two_minutes_from_first_sight():
    t = NoticeTracker()
    (e,) = t.spot(SpotNotice("terminate", None, {"action": "terminate", "time": "soon"}, bad_time="not a time"), NOW)
    assert e.deadline == NOW + 120 and e.detected_at == NOW
    assert t.spot(SpotNotice("terminate", None, bad_time="x"), NOW + 5) == []
    assert t.active["spot:terminate"].deadline == NOW + 120  # the deadline does not move with each poll


def test_latched_keys_survive_a_restart():
    t = NoticeTracker()
    t.spot(SpotNotice("terminate", NOW + 120), NOW)
    restarted = NoticeTracker(latched=t.latched)
    assert restarted.spot(SpotNotice("terminate", NOW + 120), NOW + 5) == []


def test_rebalance_once():
    t = NoticeTracker()
    assert [e.kind for e in t.rebalance(RebalanceNotice(NOW), NOW)] == [REBALANCE]
    assert t.rebalance(RebalanceNotice(NOW + 3), NOW + 3) == []


def test_scheduled_fire_then_cancel():
    t = NoticeTracker()
    ev = ScheduledEvent("e1", "instance-stop", "active", NOW + 600, None)
    (fired,) = t.scheduled([ev], NOW)
    assert fired.kind == SCHEDULED_MAINTENANCE and not fired.cancelled and fired.action == "instance-stop"
    assert t.scheduled([ev], NOW + 5) == []
    (cancel,) = t.scheduled([ScheduledEvent("e1", "instance-stop", "canceled", NOW + 600, None)], NOW + 10)
    assert cancel.cancelled
    assert t.scheduled([ScheduledEvent("e1", "instance-stop", "canceled", NOW + 600, None)], NOW + 15) == []
    assert t.active_events() == []


def test_scheduled_vanished_is_cancelled():
    t = NoticeTracker()
    t.scheduled([ScheduledEvent("e1", "system-reboot", "active", NOW + 600, None)], NOW)
    (cancel,) = t.scheduled([], NOW + 5)
    assert cancel.cancelled


def test_completed_before_seen_fires_nothing():
    assert NoticeTracker().scheduled([ScheduledEvent("e1", "instance-stop", "completed", NOW, None)], NOW) == []


def test_lifecycle_terminated_only():
    t = NoticeTracker()
    assert t.lifecycle("InService", NOW) == []
    assert [e.kind for e in t.lifecycle("Terminated", NOW)] == [ASG_TERMINATION]
    assert t.lifecycle("Terminated", NOW + 1) == []


def test_scheduled_due_window():
    t = NoticeTracker()
    (stop,) = t.scheduled([ScheduledEvent("e1", "instance-stop", "active", NOW + 1000, None)], NOW)
    assert not scheduled_is_due(stop, NOW, 900)
    assert scheduled_is_due(stop, NOW + 200, 900)
    (reboot,) = t.scheduled([ScheduledEvent("e1", "instance-stop", "active", NOW + 1000, None),
                             ScheduledEvent("e2", "system-reboot", "active", NOW + 10, None)], NOW)
    assert not scheduled_is_due(reboot, NOW, 900)
