import pytest

from agent.imds import parse
from agent.imds.parse import BadAnswer


def test_instance_action_terminate():
    n = parse.parse_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert n.action == "terminate"
    assert n.time == 1505722920.0


@pytest.mark.parametrize("action", ["stop", "hibernate", "Terminate"])
def test_instance_action_other_actions(action):
    assert parse.parse_instance_action(f'{{"action": "{action}", "time": "2017-09-18T08:22:00Z"}}').action == action.lower()


@pytest.mark.parametrize("body,reason", [
    ("", "empty"),
    ("   \n", "empty"),
    ("{not json", "malformed-json"),
    ("[1, 2]", "malformed-json"),
    ("<html><body>proxy error</body></html>", "html"),
    ("<!DOCTYPE html><html></html>", "html"),
    ('{"action": "explode", "time": "2017-09-18T08:22:00Z"}', "unknown-action"),
    ('{"time": "2017-09-18T08:22:00Z"}', "unknown-action"),
    ('{"action": "terminate\\u0000", "time": "2017-09-18T08:22:00Z"}', "unknown-action"),
    ("[" * 100000, "malformed-json"),  # deeper than the stack: RecursionError, not a crash
    ('{"action": "terminate", "time": %s}' % ("9" * 5000), "malformed-json"),  # int too long to convert
])
def test_instance_action_bad_answers(body, reason):
    with pytest.raises(BadAnswer) as exc:
        parse.parse_instance_action(body)
    assert exc.value.reason == reason


@pytest.mark.parametrize("body", [
    '{"action": "terminate", "time": "soon"}',
    '{"action": "terminate", "time": 12345}',
    '{"action": "terminate", "time": "2017-13-45T08:22:00Z"}',
    '{"action": "terminate", "time": "2017-09-18T08:22:00Z\\u0000"}',
    '{"action": "terminate"}',
])
def test_instance_action_with_a_bad_time_is_still_a_notice(body):
    """Fail safe: the action is valid, so the instance is going; the time problem is reported, not fatal."""
    n = parse.parse_instance_action(body)
    assert n.action == "terminate" and n.time is None and n.bad_time


def test_iso_time_with_fraction_and_offset():
    assert parse.parse_iso_time("2017-09-18T08:22:00.500Z") == 1505722920.5
    assert parse.parse_iso_time("2017-09-18T10:22:00+02:00") == 1505722920.0


def test_scheduled_events_dates_and_missing_not_after():
    body = ('[{"NotBefore": "21 Jan 2019 09:00:43 GMT", "Code": "instance-stop", '
            '"Description": "The instance is scheduled for stop", "EventId": "instance-event-0d59937288b749b32", '
            '"State": "active"}]')
    (ev,) = parse.parse_scheduled(body)
    assert ev.code == "instance-stop"
    assert ev.not_before == 1548061243.0
    assert ev.not_after is None
    assert ev.active


@pytest.mark.parametrize("state,active", [("active", True), ("completed", False), ("canceled", False), ("cancelled", False)])
def test_scheduled_states(state, active):
    body = f'[{{"Code": "system-reboot", "EventId": "e1", "NotBefore": "21 Jan 2019 09:00:43 GMT", "State": "{state}"}}]'
    assert parse.parse_scheduled(body)[0].active is active


def test_scheduled_empty_and_bad():
    assert parse.parse_scheduled("[]") == []
    with pytest.raises(BadAnswer):
        parse.parse_scheduled('[{"Code": "instance-stop", "NotBefore": "yesterday"}]')
    with pytest.raises(BadAnswer):
        parse.parse_scheduled('"text"')
    with pytest.raises(BadAnswer):
        parse.parse_scheduled('[{"EventId": "x"}]')


def test_rebalance():
    assert parse.parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}').notice_time == 1603786920.0
    with pytest.raises(BadAnswer):
        parse.parse_rebalance('{"noticeTime": "tomorrow"}')


def test_lifecycle_state():
    assert parse.parse_target_lifecycle_state("Terminated\n") == "Terminated"
    assert parse.parse_target_lifecycle_state("Warmed:Stopped") == "Warmed:Stopped"
    with pytest.raises(BadAnswer):
        parse.parse_target_lifecycle_state("Exploded")
    with pytest.raises(BadAnswer):
        parse.parse_target_lifecycle_state("")


def test_legacy_termination_time_garbage_is_none():
    assert parse.parse_termination_time("2015-01-05T18:02:00Z") == 1420480920.0
    assert parse.parse_termination_time("<html>") is None


def test_nul_in_scheduled_strings_is_escaped_and_reported():
    body = ('[{"Code": "instance-stop\\u0000x", "EventId": "e\\u00001", "NotBefore": "21 Jan 2019 09:00:43 GMT", '
            '"State": "active", "Description": "d\\u0000"}]')
    (ev,) = parse.parse_scheduled(body)
    assert ev.code == "instance-stop\\x00x" and ev.event_id == "e\\x001" and ev.description == "d\\x00"
    assert set(ev.escaped) == {"Code", "EventId", "Description"}
    assert ev.active


def test_scheduled_without_nul_reports_nothing_escaped():
    (ev,) = parse.parse_scheduled('[{"Code": "system-reboot", "EventId": "e1", "State": "active"}]')
    assert ev.escaped == ()


@pytest.mark.parametrize("value", ["9999-12-31T23:00:00-0060", "9999-12-31T23:59:59-23:59", "1969-12-31T23:59:59Z",
                                   "2017-09-18T08:22:00+24:00"])
def test_times_an_event_cannot_render_are_bad_times(value):
    """Year 10000 once offset, before 1970, or an offset past 23:59: Event.deadline_iso would raise
    (in a hook's environment, in the status document), so the parser refuses them."""
    with pytest.raises(BadAnswer) as exc:
        parse.parse_iso_time(value)
    assert exc.value.reason == "bad-time"
