from agent.backoff import Backoff


def test_backoff_grows_bounded_and_never_zero():
    b = Backoff(base=0.25, cap=8.0, rand=lambda: 0.0)
    delays = [b.next_delay() for _ in range(10)]
    assert delays[0] == 0.125
    assert delays == sorted(delays)
    assert max(delays) == 4.0  # half the cap: the other half is jitter
    b2 = Backoff(base=0.25, cap=8.0, rand=lambda: 0.999)
    assert max(b2.next_delay() for _ in range(20)) < 8.0
    b.reset()
    assert not b.failing
