"""Property: whatever body IMDS serves on a notice path, over real HTTP from the simulator, one poll of
the watcher gives an event or a counted bad answer (or, for the list and state paths, a clean
"nothing due"), and never raises. The parsers' own property is in tests/unit/test_properties.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import IMDSSection
from agent.imds.client import IMDSClient
from agent.sim.imds_server import IMDSSimulator
from agent.watchers import imds as watcher_mod
from agent.watchers.imds import IMDSWatcher
from tests.unit.test_properties import bodies


@pytest.fixture(scope="module")
def sim():
    s = IMDSSimulator("127.0.0.1", 0).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(sim):
    c = IMDSClient(sim.url, timeout=2.0)
    yield c
    c.close()


PATHS = {watcher_mod.SPOT: "spot/instance-action", watcher_mod.REBALANCE: "events/recommendations/rebalance",
         watcher_mod.SCHEDULED: "events/maintenance/scheduled", watcher_mod.LIFECYCLE: "autoscaling/target-lifecycle-state"}


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(PATHS)), body=bodies)
def test_any_body_is_an_event_or_a_counted_bad_answer(sim, client, path, body):
    sim.control("fault", {"kind": "malformed", "path": PATHS[path], "body": body, "count": 1})
    w = IMDSWatcher(client, IMDSSection(endpoint=sim.url))
    events = w.poll(path)
    assert isinstance(events, list)
    if path == watcher_mod.SPOT:
        # A 200 on instance-action is a notice or a problem; with a bad time it is both.
        assert len(events) == 1 or w.bad_answers >= 1, body
    elif path == watcher_mod.REBALANCE:
        assert len(events) == 1 or w.bad_answers == 1, body
    for e in events:
        assert "\x00" not in e.action and "\x00" not in e.key
        json.dumps(e.to_dict())  # the status document and notice.json can carry it
