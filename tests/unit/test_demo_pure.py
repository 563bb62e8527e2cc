"""The demo's pure parts: its agent config, the boot and drain timelines, the text and SVG renderings."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from agent.config import parse
from agent.demo.agent_config import DemoSettings, paths_for, render
from agent.demo.output import render_report
from agent.demo.story import boot_marks, drain_steps, step_starts
from agent.demo.timeline import Timeline, fmt_seconds, render_svg, render_text


def test_demo_config_is_a_valid_agent_config_with_block_devices():
    paths = paths_for("/tmp/demo/instance-1")
    text = render(paths, DemoSettings(notice_window=40), "http://127.0.0.1:1", "http://127.0.0.1:2",
                  block_devices=True, dev_root="/tmp/demo/host/dev", sys_root="/tmp/demo/host/sys", s3_checkpoints=True)
    cfg = parse(text, "demo")
    assert cfg.imds.endpoint == "http://127.0.0.1:1" and cfg.aws.endpoint_url == "http://127.0.0.1:2"
    assert cfg.host.dev_root == "/tmp/demo/host/dev"
    [vol] = cfg.volumes
    assert vol.latest_snapshot == {"spot-agent:volume": "ckpt", "spot-agent:run": "demo-run"}
    assert vol.create is not None and vol.create.size_gib == 1 and vol.mount == paths.volume_mount
    [ck] = cfg.checkpoints
    assert ck.dir == paths.checkpoint_dir and ck.dir.startswith(vol.mount + "/")
    assert cfg.drain.workload.pidfile == paths.pidfile
    # the reserves fit the simulated window, leaving the workload time to checkpoint
    d = cfg.drain
    assert 40 - d.margin - d.snapshot_reserve - d.upload_reserve - d.lifecycle_reserve >= d.workload.checkpoint_timeout
    assert "40 s (AWS gives 120 s)" in text


def test_demo_config_without_block_devices_has_no_volumes_or_host():
    cfg = parse(render(paths_for("/tmp/d/i"), DemoSettings(), "http://127.0.0.1:1", "http://127.0.0.1:2",
                       block_devices=False), "demo")
    assert cfg.volumes == [] and cfg.checkpoints == []
    assert cfg.host.dev_root == "/dev"
    assert cfg.datasets[0].source == "s3://spot-agent-demo/datasets/tiny-corpus/"


def test_boot_marks_fold_progress_and_stop_at_ready():
    msgs = [(10.0, "STATUS=starting"), (10.1, "STATUS=reading instance identity from IMDS"),
            (10.5, "STATUS=pre-warming s3://b/p/ -> /d"), (10.7, "STATUS=pre-warming /d: 50% of 4 MB, ETA 1s"),
            (11.0, "READY=1"), (11.0, "STATUS=ready; watching IMDS"), (12.0, "STATUS=draining: notify (1 s budget)")]
    marks = boot_marks(msgs, ready_at=11.0)
    assert [m[1] for m in marks] == ["reading instance identity from IMDS", "pre-warming s3://b/p/ -> /d"]
    assert abs(marks[0][2] - 0.4) < 1e-9 and abs(marks[1][2] - 0.5) < 1e-9


def test_drain_steps_take_starts_from_status_lines_and_chain_skipped_ones():
    rec = {"started": 100.0,
           "plan": {"steps": [{"name": n} for n in ("notify", "wait", "snapshot", "upload", "lifecycle")]},
           "steps": {"notify": {"state": "ok", "seconds": 0.01}, "wait": {"state": "ok", "seconds": 1.0},
                     "snapshot": {"state": "ok", "seconds": 0.2}, "upload": {"state": "skipped", "seconds": 0.0},
                     "lifecycle": {"state": "ok", "seconds": 0.05}}}
    msgs = [(50.0, "STATUS=draining: snapshot (120 s budget)"),  # an earlier (rebalance) drain: ignored
            (100.01, "STATUS=draining: notify (1 s budget)"), (100.03, "STATUS=draining: wait (15 s budget)"),
            (101.1, "STATUS=draining: snapshot (30 s budget)"), (101.4, "STATUS=draining: lifecycle (20 s budget)")]
    steps = drain_steps(rec, msgs)
    assert [s["name"] for s in steps] == ["notify", "wait", "snapshot", "upload", "lifecycle"]
    starts = {s["name"]: s["start"] for s in steps}
    assert starts["snapshot"] == 101.1 and starts["lifecycle"] == 101.4
    assert abs(starts["upload"] - 101.3) < 1e-9  # after the snapshot ended: no status line for a skipped step
    assert step_starts(msgs, 99.5)["notify"] == 100.01
    # without messages every step starts where the one before ended
    plain = drain_steps(rec)
    assert plain[0]["start"] == 100.0 and abs(plain[2]["start"] - 101.01) < 1e-9


def test_text_timeline_is_ordered_with_offsets_states_and_durations():
    tl = Timeline(1000.0)
    tl.add(1002.5, "drain", "snapshot", seconds=0.07, state="ok")
    tl.add(1001.0, "cloud", "spot notice")
    lines = render_text(tl).splitlines()
    assert lines[0].startswith("  +  1.0s  cloud") and "spot notice" in lines[0]
    assert "+  2.5s  drain" in lines[1] and "70 ms  [ok] snapshot" in lines[1]
    assert fmt_seconds(1.234) == "1.2 s" and fmt_seconds(None) == ""


def _drain(finished: float) -> dict:
    return {"kind": "spot-interruption", "ok": True, "window": 40, "notice_at": 0.0, "detected_at": 0.1,
            "deadline": 40.0, "finished_at": finished,
            "steps": [{"name": "notify", "state": "ok", "start": 0.1, "seconds": 0.01, "reason": ""},
                      {"name": "wait", "state": "cut", "start": 0.11, "seconds": 2.0, "reason": "budget <"},
                      {"name": "upload", "state": "skipped", "start": 2.11, "seconds": 0.0, "reason": ""},
                      {"name": "snapshot", "state": "failed", "start": 2.11, "seconds": 0.5, "reason": "x & y"}]}


def test_svg_is_well_formed_with_a_bar_per_step_and_the_margin():
    svg = render_svg(_drain(finished=2.61), title="drain <demo>")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    fills = [r.get("fill") for r in root.iter(ns + "rect")]
    for color in ("#2e7d32", "#f9a825", "#9e9e9e", "#c62828"):
        assert color in fills
    texts = " ".join(t.text or "" for t in root.iter(ns + "text"))
    assert "37.4 s to spare" in texts and "drain <demo>" in texts and "deadline" in texts
    titles = [t.text for t in root.iter(ns + "title")]
    assert any("x & y" in (t or "") for t in titles)


def test_svg_of_a_late_drain_shows_no_spare_time():
    svg = render_svg(_drain(finished=45.0))
    ET.fromstring(svg)
    assert "to spare" not in svg and "5.0 s AFTER the deadline" in svg


def test_report_marks_failed_and_not_applicable_checks():
    text = render_report({"simulated": ["a"], "started_at": 0.0, "timeline": [], "summary": {}, "seconds": 1.0,
                          "checks": [{"name": "x", "ok": False, "detail": "bad"}, {"name": "y", "ok": None, "detail": "n"}],
                          "error": "RuntimeError: boom"})
    assert "FAIL x: bad" in text and "n/a  y: n" in text
    assert "demo FAILED: RuntimeError: boom" in text and "did not resume" in text
    live = render_report({"simulated": ["a"], "summary": {}, "checks": []}, live=True)
    assert "what is simulated" not in live


def test_timeline_option_is_checked_before_running(tmp_path):
    from agent.commands.demo import _timeline_target

    assert _timeline_target("") == ""
    assert _timeline_target(str(tmp_path / "t.svg")) == ""
    assert "must end in .svg or .png" in _timeline_target(str(tmp_path / "t.pdf"))
    assert "does not exist" in _timeline_target(str(tmp_path / "nope" / "t.svg"))


def test_dataset_content_is_deterministic_and_tree_hashes_skip_hidden_and_lost_found(tmp_path):
    import hashlib

    from agent.demo.environment import dataset_bytes, tree_hashes

    a = dataset_bytes("train/x.bin", 100_000)
    assert len(a) == 100_000 and a == dataset_bytes("train/x.bin", 100_000) and a != dataset_bytes("train/y.bin", 100_000)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt-00000010.json").write_bytes(b"{}")
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "lost+found" / "x").write_bytes(b"x")
    (tmp_path / ".spot-agent-sync").mkdir()
    (tmp_path / ".spot-agent-sync" / "m").write_bytes(b"m")
    (tmp_path / ".probe").write_bytes(b"p")
    assert tree_hashes(str(tmp_path)) == {"run/ckpt-00000010.json": hashlib.sha256(b"{}").hexdigest()}
    assert tree_hashes(str(tmp_path / "missing")) == {}
