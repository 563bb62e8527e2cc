"""Each benchmark of bench/ at a tiny size: it completes, and its table has every row (see conftest)."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import peers, run_bench, table_rows


@pytest.mark.root
def test_volumes_bench_brings_up_each_filesystem_blank_and_existing():
    out = run_bench("bench.volumes_bench", "--runs", "1", "--size-gib", "1")
    rows = table_rows(out, "| fs | volume |")
    assert [(r[0], r[1].split()[0]) for r in rows] == [("ext4", "blank"), ("ext4", "existing"),
                                                       ("xfs", "blank"), ("xfs", "existing")]
    assert all(float(r[2]) > 0 for r in rows)


@pytest.mark.root
def test_drain_bench_drains_a_small_checkpoint_with_its_upload():
    out = run_bench("bench.drain_bench", "--trials", "1", "--size-mib", "8", "--json")
    summary = json.loads(out)["summary"]
    assert summary["all_ok"] and summary["upload"] and summary["trials"] == 1
    for mark in ("notice", "workload-signalled", "checkpoint-written", "snapshot-requested", "thawed",
                 "upload-committed", "lifecycle-completed"):
        assert mark in summary["timeline_median"], (mark, summary["timeline_median"])
    assert summary["frozen_ms_max"] > 0


def test_detection_bench_times_the_hook_at_each_interval_and_idles():
    out = run_bench("bench.detection", "--trials", "1", "--peer-trials", "1", "--idle", "0.5",
                    "--peer-intervals", "0.3,0.5")
    rows = table_rows(out, "| configuration |")
    assert [r[0] for r in rows] == ["spot-agent (poll 1 s)", "at NTH's interval (0.3 s)", "at AWS's suggestion (0.5 s)"]
    assert all(r[1] == "1" and float(r[2]) > 0 for r in rows)
    assert "Idle over" in out and "IMDS requests/s" in out


def test_fleet_drain_bench_drains_every_agent_without_a_late_call():
    data = json.loads(run_bench("bench.fleet_drain", "--agents", "2", "--window", "20", "--json"))
    s = data["summary"]
    assert (s["agents"], s["drains_ok"], s["snapshots"], s["lifecycle_completed"]) == (2, 2, 2, 2)
    assert s["late_calls"] == 0


def test_transfer_bench_peers_rows_for_spot_agent_and_each_installed_peer():
    tools = ["spot-agent", *peers()]
    out = run_bench("bench.transfer_bench", "peers", "--a-files", "30", "--b-mib", "2", "--d-gib", "0.03125",
                    "--timeout", "60", "--tools", ",".join(tools))
    rows = {(r[0], r[1]): r for r in table_rows(out, "| corpus | tool |")}
    for corpus in "ABCD":
        for tool in tools:
            assert (corpus, tool) in rows, (corpus, tool, out[-2000:])
        assert rows[(corpus, "spot-agent")][4] == "1/1", rows[(corpus, "spot-agent")]


def test_transfer_bench_engines_downloads_each_corpus_with_each_engine():
    out = run_bench("bench.transfer_bench", "engines", "--a-files", "30", "--b-mib", "2")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    seen = {(r["corpus"], r["engine"]) for r in rows}
    assert {("A", "ours"), ("A", "s3transfer"), ("B", "ours"), ("B", "s3transfer")} <= seen
    assert all(r["ok"] for r in rows)


def test_planner_bench_plans_a_fresh_and_a_resync_listing():
    out = run_bench("bench.transfer_bench", "planner", "--keys", "2000")
    rows = {r["mode"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    assert (rows["fresh"]["downloads"], rows["fresh"]["skips"]) == (2000, 0)
    assert (rows["resync"]["downloads"], rows["resync"]["skips"]) == (0, 2000)
    assert rows["fresh"]["peak_rss_mib"] > 0
