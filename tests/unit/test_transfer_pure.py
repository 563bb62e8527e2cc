"""Token bucket, progress figures, rate parsing, retry classification (pure)."""

from __future__ import annotations

import random

import pytest

from agent.transfer.bandwidth import TokenBucket
from agent.transfer.progress import RateMeter, SyncProgress, eta, parse_rate, render_bar
from agent.transfer.retry import backoff, client_error_retryable


def test_token_bucket_caps_the_average_rate():
    b = TokenBucket(rate=1000, burst=100, now=0.0)
    now, waited = 0.0, 0.0
    for _ in range(50):
        w = b.reserve(100, now)
        waited += w
        now += w
    # 5000 bytes at 1000 B/s, minus the 100-byte burst: ~4.9 s.
    assert 4.8 <= now <= 5.0


def test_token_bucket_refills_but_not_beyond_burst():
    b = TokenBucket(rate=1000, burst=100, now=0.0)
    assert b.reserve(100, 0.0) == 0.0
    assert b.reserve(100, 10.0) == 0.0  # refilled to 100, not 10000
    assert b.reserve(100, 10.0) == pytest.approx(0.1)


def test_rate_meter_and_eta():
    m = RateMeter(window=5)
    for t in range(10):
        m.add(float(t), t * 1000)
    assert m.rate() == pytest.approx(1000)
    assert eta(5000, 1000) == 5 and eta(0, 0) == 0 and eta(10, 0) is None


def test_render_bar_shows_bytes_rate_and_eta():
    line = render_bar(SyncProgress(512 * 1024, 1024 * 1024, 3, 10, 1024 * 1024, 0.5), width=100)
    assert line.startswith("[") and " 50%" in line and "512.0 KiB/1.0 MiB" in line and "ETA 00:01" in line
    assert "3/10 files" in line and len(line) <= 100


@pytest.mark.parametrize("text,value", [("0", 0), ("1000", 1000), ("500K", 512000), ("10M", 10 << 20),
                                        ("10MiB", 10 << 20), ("1.5G", int(1.5 * (1 << 30))), ("10MB/s", 10 << 20)])
def test_parse_rate(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "-1M", "10X", ""])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_retry_classification_and_backoff():
    assert client_error_retryable("SlowDown", 503) and client_error_retryable("Whatever", 500)
    assert not client_error_retryable("AccessDenied", 403) and not client_error_retryable("NoSuchKey", 404)
    r = random.Random(1)
    assert all(0 <= backoff(a, rnd=r) <= min(5.0, 0.1 * 2 ** a) for a in range(10))


def test_range_size_spreads_concurrency_over_the_large_files():
    from agent.transfer.download import range_size

    MiB = 1024 * 1024
    assert range_size(256 * MiB, 8 * MiB, 16, 1) == 16 * MiB  # one file: 16 streams
    assert range_size(256 * MiB, 8 * MiB, 16, 4) == 64 * MiB  # four files: 4 streams each
    assert range_size(4096 * MiB, 8 * MiB, 16, 100) == 64 * MiB  # capped
    assert range_size(20 * MiB, 8 * MiB, 16, 1) == 8 * MiB  # never below part_size
    assert range_size(20 * MiB, 100 * MiB, 16, 1) == 100 * MiB
