"""Retries on the drain path: bounded by the step's budget (fake clock), never a call after it; the
per-volume snapshot spacing plan."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from agent.aws import Budgeted, Clients, retry_after
from agent.backoff import OutOfTime, retry_until
from agent.clock import FakeClock
from agent.drain.snapshots import plan_spacing


def err(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_what_is_retried():
    assert retry_after(err("RequestLimitExceeded", 503)) == 0.0
    assert retry_after(err("Throttling")) == 0.0
    assert retry_after(err("SnapshotCreationPerVolumeRateExceeded")) >= 1.0
    assert retry_after(err("ConcurrentSnapshotLimitExceeded")) > 0
    assert retry_after(err("IncorrectState")) > 0
    assert retry_after(err("InternalError", 500)) == 0.0
    assert retry_after(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")) == 0.0
    for final in ("ValidationError", "VolumeInUse", "InvalidVolume.ZoneMismatch", "InvalidParameterValue", "AccessDenied"):
        assert retry_after(err(final)) is None, final
    # a call that may have happened is not repeated blindly when it is not idempotent
    assert retry_after(err("InternalError", 500), idempotent=False) is None
    assert retry_after(EndpointConnectionError(endpoint_url="x"), idempotent=False) is None
    assert retry_after(err("RequestLimitExceeded", 503), idempotent=False) == 0.0


def test_retry_until_stops_before_the_deadline_and_says_why():
    clock = FakeClock()
    starts = []

    def fn():
        starts.append(clock.monotonic())
        raise err("RequestLimitExceeded", 503)

    deadline = clock.monotonic() + 5.0
    with pytest.raises(OutOfTime) as info:
        retry_until(fn, deadline=deadline, retry_after=retry_after, what="drain snapshot create_snapshot", clock=clock)
    assert len(starts) >= 3
    assert all(t < deadline for t in starts)
    assert "RequestLimitExceeded" in str(info.value) and "budget" in str(info.value)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g > 0 for g in gaps)  # jittered backoff, never a tight loop


def test_retry_until_returns_once_the_throttling_ends():
    clock = FakeClock()
    answers = [err("Throttling"), err("Throttling"), "ok"]

    def fn():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert retry_until(fn, deadline=clock.monotonic() + 30, retry_after=retry_after, clock=clock) == "ok"


def test_a_final_error_is_raised_at_once():
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(1)
        raise err("VolumeInUse")

    with pytest.raises(ClientError):
        retry_until(fn, deadline=clock.monotonic() + 30, retry_after=retry_after, clock=clock)
    assert len(calls) == 1


class Flaky:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0

    def create_snapshot(self, **kw):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return {"SnapshotId": "snap-1"}

    def complete_lifecycle_action(self, **kw):
        return self.create_snapshot(**kw)


def test_budgeted_clients_retry_within_the_budget_and_count():
    clock = FakeClock()
    ec2 = Flaky([err("RequestLimitExceeded", 503), err("SnapshotCreationPerVolumeRateExceeded")])
    clients = Clients(ec2=None, s3=None, autoscaling=None, region="r", drain_ec2=ec2, drain_autoscaling=Flaky([]))
    b = clients.budgeted(20.0, clock)
    assert b.ec2.create_snapshot(VolumeId="vol-1") == {"SnapshotId": "snap-1"}
    assert ec2.calls == 3 and b.ec2.stats.retries == 2
    assert b.ec2.stats.by_code == {"RequestLimitExceeded": 1, "SnapshotCreationPerVolumeRateExceeded": 1}


def test_budgeted_does_not_repeat_an_ambiguous_create_snapshot():
    clock = FakeClock()
    ec2 = Flaky([err("InternalError", 500)])
    with pytest.raises(ClientError):
        Budgeted(ec2, clock.monotonic() + 20, clock).create_snapshot(VolumeId="vol-1")
    assert ec2.calls == 1
    asg = Flaky([err("InternalError", 500)])
    assert Budgeted(asg, clock.monotonic() + 20, clock).complete_lifecycle_action() == {"SnapshotId": "snap-1"}


def test_no_call_after_the_budget():
    clock = FakeClock()
    ec2 = Flaky([err("Throttling")] * 1000)
    b = Budgeted(ec2, clock.monotonic() + 3.0, clock)
    with pytest.raises(OutOfTime):
        b.create_snapshot(VolumeId="vol-1")
    assert clock.monotonic() < b.deadline  # it gave up before sleeping past the deadline
    n = ec2.calls
    clock.advance(3.0)
    with pytest.raises(OutOfTime):
        b.create_snapshot(VolumeId="vol-1")
    assert ec2.calls == n  # the budget is spent: nothing more goes out


def test_spacing_waits_out_the_rest_when_it_fits():
    d = plan_spacing("ckpt", last_requested=100.0, now=104.0, budget=30.0, s3_follows=True)
    assert not d.skip and 11.0 < d.wait < 11.6 and "15 s" in d.reason


def test_spacing_skips_to_s3_when_the_wait_does_not_fit_and_says_so():
    d = plan_spacing("ckpt", last_requested=100.0, now=102.0, budget=8.0, s3_follows=True)
    assert d.skip and d.wait == 0
    assert "ckpt: snapshot skipped" in d.reason and "S3 upload carries the checkpoint" in d.reason


def test_spacing_without_s3_tries_as_late_as_the_budget_allows():
    d = plan_spacing("ckpt", last_requested=100.0, now=102.0, budget=8.0, s3_follows=False)
    assert not d.skip and d.wait == pytest.approx(6.0) and "trying anyway" in d.reason


def test_no_spacing_needed():
    assert plan_spacing("ckpt", None, 100.0, 5.0, True).wait == 0
    assert plan_spacing("ckpt", 80.0, 100.0, 5.0, True).wait == 0
