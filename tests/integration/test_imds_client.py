"""The IMDSv2 client against the simulator: tokens, 401 refresh, 403, throttling, endless bodies."""

import pytest

from agent.clock import Clock
from agent.imds.client import IMDSClient, IMDSDisabled, IMDSError

ID = "/latest/meta-data/instance-id"


class MovableClock(Clock):
    def __init__(self):
        self.offset = 0.0

    def monotonic(self):
        import time

        return time.monotonic() + self.offset


def client(sim, **kw):
    kw.setdefault("timeout", 1.0)
    return IMDSClient(sim.url, **kw)


def test_token_reused_then_refreshed_by_the_clock(imds_sim):
    clock = MovableClock()
    c = client(imds_sim, token_ttl=600, clock=clock)
    for _ in range(5):
        assert c.get(ID).text == "i-0123456789abcdef0"
    assert imds_sim.state.requests_by_path["/latest/api/token"] == 1
    clock.offset = 590  # within the refresh margin of the 600 s TTL: refresh before it expires
    c.get(ID)
    assert imds_sim.state.requests_by_path["/latest/api/token"] == 2


def test_401_refreshes_once_and_replaces_the_header(imds_sim):
    c = client(imds_sim)
    c.get(ID)
    imds_sim.control("fault", {"kind": "token-expiry"})
    assert c.get(ID).text == "i-0123456789abcdef0"
    assert imds_sim.state.requests_by_path["/latest/api/token"] == 2
    assert imds_sim.state.max_token_headers == 1


def test_403_is_disabled_not_v1(imds_sim):
    imds_sim.control("fault", {"kind": "403"})
    with pytest.raises(IMDSDisabled):
        client(imds_sim).get(ID)
    # Even with a token already held, a 403 on GET is reported, never retried without a token.
    imds_sim.control("fault", {"kind": "403", "on": False})
    c = client(imds_sim)
    c.get(ID)
    imds_sim.control("fault", {"kind": "403"})
    with pytest.raises(IMDSDisabled):
        c.get(ID)


def test_v1_only_when_allowed(imds_sim):
    from agent.sim.imds_server import IMDSSimulator

    v1 = IMDSSimulator("127.0.0.1", 0, require_v2=False).start()
    try:
        # A simulator that has no token endpoint at all is faked by pointing at a path prefix.
        c = IMDSClient(v1.url + "/nothing-here", allow_imdsv1=False)
        with pytest.raises(IMDSError):
            c.get(ID)
    finally:
        v1.stop()


def test_throttle_and_5xx_are_transient(imds_sim):
    c = client(imds_sim)
    c.get(ID)
    imds_sim.control("fault", {"kind": "429", "count": 1})
    with pytest.raises(IMDSError) as exc:
        c.get(ID)
    assert exc.value.status == 429
    imds_sim.control("fault", {"kind": "5xx", "count": 1, "code": 502})
    with pytest.raises(IMDSError) as exc:
        c.get(ID)
    assert exc.value.status == 502
    assert c.get(ID).found


def test_endless_body_times_out(imds_sim):
    c = client(imds_sim, timeout=0.5)
    c.get(ID)
    imds_sim.control("fault", {"kind": "hang", "count": 1})
    with pytest.raises(IMDSError) as exc:
        c.get(ID)
    assert exc.value.reason == "timeout"
    assert c.get(ID).found


def test_connection_refused_is_transient():
    with pytest.raises(IMDSError) as exc:
        IMDSClient("http://127.0.0.1:9", timeout=0.5).get(ID)
    assert exc.value.reason == "connection"


@pytest.mark.parametrize("first", ["token", "get"])
def test_headers_that_trickle_hit_the_total_deadline(imds_sim, first):
    """Each header byte arrives well within a per-read timeout; only a deadline over the whole request
    (connect + headers + body) ends it. Before, one such answer held the caller for ten minutes."""
    import threading
    import time

    c = client(imds_sim, timeout=0.5)
    if first == "get":
        c.get(ID)  # a token first, so the trickle hits the GET (else it hits the token PUT)
    imds_sim.control("fault", {"kind": "slow-headers", "count": 1, "seconds": 0.05})
    outcome = []

    def call():
        started = time.monotonic()
        try:
            c.get(ID)
            outcome.append(("answered", time.monotonic() - started))
        except IMDSError as exc:
            outcome.append((exc.reason, time.monotonic() - started))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout=10)
    assert outcome, "the request was still blocked on its headers after 10 s"
    assert outcome[0][0] == "timeout"
    assert c.get(ID).found  # the next request gets a fresh connection and an answer
