"""Each benchmark of bench/ at its smoke size (bench/all.py's quick commands): it completes, and its
table has every row (see conftest)."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.bench.conftest import ROOT, peers, quick, run_bench, table_rows


def test_every_benchmark_script_is_in_the_registry():
    from bench.all import BENCHES, HELPERS

    modules = {b.module for b in BENCHES} | set(HELPERS)
    scripts = {os.path.relpath(p, ROOT)[:-3].replace("/", ".")
               for p in glob.glob(os.path.join(ROOT, "bench", "**", "*.py"), recursive=True)
               if not p.endswith("__init__.py")}
    assert scripts - modules == set(), "add these to bench/all.py (BENCHES with a quick run, or HELPERS)"
    assert all(b.quick and b.full for b in BENCHES)


def test_bench_all_lists_every_command():
    from bench.all import BENCHES

    out = run_bench("bench.all", "--list")
    assert out.count("## ") == sum(len(b.full) for b in BENCHES)
    quick_out = run_bench("bench.all", "--list", "--quick", "--only", "detection")
    assert quick_out.count("## ") == 1 and "--peer-intervals" in quick_out


@pytest.mark.root
def test_volumes_bench_brings_up_each_filesystem_blank_and_existing():
    rows = table_rows(quick("volumes"), "| fs | volume |")
    assert [(r[0], r[1].split()[0]) for r in rows] == [("ext4", "blank"), ("ext4", "existing"),
                                                       ("xfs", "blank"), ("xfs", "existing")]
    assert all(float(r[2]) > 0 for r in rows)


@pytest.mark.root
def test_drain_bench_drains_a_small_checkpoint_with_its_upload():
    summary = json.loads(quick("drain"))["summary"]
    assert summary["all_ok"] and summary["upload"] and summary["trials"] == 1
    for mark in ("notice", "workload-signalled", "checkpoint-written", "snapshot-requested", "thawed",
                 "upload-committed", "lifecycle-completed"):
        assert mark in summary["timeline_median"], (mark, summary["timeline_median"])
    assert summary["frozen_ms_max"] > 0


def test_detection_bench_times_the_hook_at_each_interval_and_idles():
    out = quick("detection")
    rows = table_rows(out, "| configuration |")
    assert [r[0] for r in rows] == ["spot-agent (poll 1 s)", "at NTH's interval (0.3 s)", "at AWS's suggestion (0.5 s)"]
    assert all(r[1] == "1" and float(r[2]) > 0 for r in rows)
    assert "Idle over" in out and "IMDS requests/s" in out


def test_fleet_drain_bench_drains_every_agent_without_a_late_call():
    s = json.loads(quick("fleet"))["summary"]
    assert (s["agents"], s["drains_ok"], s["snapshots"], s["lifecycle_completed"]) == (2, 2, 2, 2)
    assert s["late_calls"] == 0


def test_transfer_bench_peers_rows_for_spot_agent_and_each_installed_peer():
    rows = {(r[0], r[1]): r for r in table_rows(quick("transfer", 0), "| corpus | tool |")}
    for corpus in "ABCD":
        for tool in ["spot-agent", *peers()]:
            assert (corpus, tool) in rows, (corpus, tool, sorted(rows))
        assert rows[(corpus, "spot-agent")][4] == "1/1", rows[(corpus, "spot-agent")]


def test_transfer_bench_engines_downloads_each_corpus_with_each_engine():
    rows = [json.loads(line) for line in quick("transfer", 1).splitlines() if line.startswith("{")]
    seen = {(r["corpus"], r["engine"]) for r in rows}
    assert {("A", "ours"), ("A", "s3transfer"), ("B", "ours"), ("B", "s3transfer")} <= seen
    assert all(r["ok"] for r in rows)


def test_planner_bench_plans_a_fresh_and_a_resync_listing():
    out = quick("planner")
    rows = {r["mode"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    assert (rows["fresh"]["downloads"], rows["fresh"]["skips"]) == (2000, 0)
    assert (rows["resync"]["downloads"], rows["resync"]["skips"]) == (0, 2000)
    assert rows["fresh"]["peak_rss_mib"] > 0
