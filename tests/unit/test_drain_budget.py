"""The drain planner: reserves, cuts, skips, hibernate order, shutdown budget, rebalance plans."""

from __future__ import annotations

from agent.config import parse
from agent.drain.planner import build_plan, parse_timeout_stop, wait_conditions
from agent.drain.model import DrainReport, Plan, StepReport
from agent.events import Event

NOW = 1_800_000_000.0

FULL = """
[[volumes]]
name = "ckpt"
mount = "/mnt/ckpt"
volume_id = "vol-0123456789abcdef0"

[[volumes]]
name = "scratch"
mount = "/mnt/scratch"
instance_store = true

[[checkpoints]]
dir = "/mnt/ckpt/run"
s3 = "s3://bucket/ckpt/"

[[hooks]]
on = ["spot-interruption", "shutdown"]
command = ["/usr/local/bin/save"]

[drain.workload]
unit = "train.service"
marker = "/mnt/ckpt/run/DONE"

[drain.workload.webhook]
url = "http://127.0.0.1:9/drain"
"""


def spot(seconds_left, action="terminate"):
    return Event("spot-interruption", action, NOW + seconds_left, "spot:1", NOW)


def names_states(plan: Plan):
    return [(s.name, s.state) for s in plan.steps]


def test_two_minute_notice_fits_everything():
    plan = build_plan(spot(120), parse(FULL), NOW, 90)
    assert plan.names() == ["notify", "wait", "snapshot", "upload", "retention", "lifecycle"]
    assert all(s.state == "planned" for s in plan.steps), plan.render()
    assert plan.step("notify").budget == 5.0
    assert plan.step("wait").budget == 60.0
    # usable 110 s: 65 s early, reserves 5 + 15 + 2, the rest is slack for the upload
    assert plan.step("snapshot").budget == 5.0
    assert plan.step("lifecycle").budget == 2.0
    assert plan.step("upload").budget == 110 - 65 - 5 - 2
    assert "ckpt" in plan.step("snapshot").detail and "scratch" not in plan.step("snapshot").detail


def test_short_notice_cuts_early_steps_and_keeps_reserves():
    plan = build_plan(spot(40), parse(FULL), NOW, 90)
    # usable 30 s, reserves 22 s: 8 s for the early steps
    assert plan.step("notify").state == "planned" and plan.step("notify").budget == 5.0
    assert plan.step("wait").state == "cut" and plan.step("wait").budget == 3.0
    assert "reserved for persistence" in plan.step("wait").reason
    assert [plan.step(n).budget for n in ("snapshot", "upload", "lifecycle")] == [5.0, 15.0, 2.0]


def test_twenty_seconds_left_skips_waiting_but_snapshots():
    plan = build_plan(spot(20), parse(FULL), NOW, 90)
    # A signal costs milliseconds: notify always happens, the wait is what is cut.
    assert plan.step("notify").state == "cut" and plan.step("notify").budget == 1.0
    assert "notify still runs" in plan.step("notify").reason
    assert plan.budget_at("notify", NOW) == 1.0
    assert plan.step("wait").state == "skipped"
    assert "reserved for persistence" in plan.step("wait").reason
    snap = plan.step("snapshot")
    assert snap.state == "planned" and snap.budget == 5.0
    # usable 10 s < 22 s of reserves: persistence uses the margin
    assert any("margin" in n for n in plan.notes)
    assert plan.budget_at("snapshot", NOW) >= 5.0


def test_twenty_seconds_left_without_s3_cuts_rather_than_skips():
    cfg = parse(FULL.replace('[[checkpoints]]\ndir = "/mnt/ckpt/run"\ns3 = "s3://bucket/ckpt/"\n', ""))
    plan = build_plan(spot(20), cfg, NOW, 90)
    # usable 10 s, reserves 5 + 2: 3 s early
    assert plan.step("upload").state == "skipped"
    assert plan.step("notify").state == "cut" and plan.step("notify").budget == 3.0
    assert plan.step("wait").state == "skipped"


def test_deadline_already_passed_still_plans_persistence():
    plan = build_plan(spot(-5), parse(FULL), NOW, 90)
    assert plan.step("notify").state == "cut" and plan.budget_at("notify", NOW) == 1.0
    assert plan.budget_at("snapshot", NOW) == 1.0  # the floor
    assert plan.budget_at("lifecycle", NOW) == 1.0


def test_hibernate_snapshots_first():
    plan = build_plan(spot(120, "hibernate"), parse(FULL), NOW, 90)
    assert plan.names()[:2] == ["snapshot", "upload"]
    assert plan.names()[-1] == "lifecycle"
    assert any("hibernate" in n for n in plan.notes)


def test_shutdown_uses_the_budget():
    ev = Event("shutdown", "", None, "shutdown", NOW)
    plan = build_plan(ev, parse(FULL), NOW, 45)
    assert plan.deadline == NOW + 45
    assert "shutdown budget 45" in plan.deadline_source
    assert plan.step("wait").budget == 45 - 10 - 22 - 5


def test_budget_at_passes_unused_time_forward_but_never_the_reserves():
    plan = build_plan(spot(120), parse(FULL), NOW, 90)
    # notify took 1 s of its 5: wait may use up to its 60 s
    assert plan.budget_at("wait", NOW + 1, done={"notify"}) == 60.0
    # at NOW+100 only 10 s remain before the margin; 22 s are reserved: wait gets nothing
    assert plan.budget_at("wait", NOW + 100, done={"notify"}) == 0.0
    # the snapshot at NOW+100 may use the margin up to its reserve
    assert plan.budget_at("snapshot", NOW + 100, done={"notify", "wait"}) == 5.0
    # once the snapshot is done, its reserve is no longer held back from the upload
    assert plan.budget_at("upload", NOW + 30, done={"notify", "wait", "snapshot"}) == 120 - 10 - 30 - 2


def test_nothing_configured_skips_everything_with_reasons():
    plan = build_plan(spot(120), parse(""), NOW, 90)
    for s in plan.steps:
        if s.name == "lifecycle":
            continue
        assert s.state == "skipped" and s.reason, s
    text = plan.render()
    assert "nothing to notify" in text and "no volumes to snapshot" in text


def test_lifecycle_skipped_when_not_in_a_group():
    plan = build_plan(spot(120), parse(FULL), NOW, 90, lifecycle=False)
    assert plan.step("lifecycle").state == "skipped"
    assert plan.step("upload").budget == 110 - 65 - 5


def test_wait_auto_combines_hooks_and_marker():
    cfg = parse(FULL)
    assert wait_conditions(cfg, "spot-interruption") == ["hooks", "marker"]
    assert wait_conditions(cfg, "manual") == ["marker"]
    cfg.drain.workload.marker = ""
    assert wait_conditions(cfg, "manual") == ["process"]
    cfg.drain.workload.wait = "none"
    assert wait_conditions(cfg, "spot-interruption") == []


def test_rebalance_checkpoint_plan_leaves_the_workload_alone():
    ev = Event("rebalance-recommendation", "", None, "rebalance:1", NOW)
    plan = build_plan(ev, parse(FULL), NOW, 90)
    assert plan.names() == ["snapshot", "upload", "retention"]
    assert plan.step("snapshot").state == "planned"
    cfg = parse(FULL)
    cfg.drain.rebalance = "none"
    assert all(s.state == "skipped" for s in build_plan(ev, cfg, NOW, 90).steps)
    cfg.drain.rebalance = "drain"
    full = build_plan(ev, cfg, NOW, 90)
    assert "notify" in full.names() and full.step("lifecycle").state == "skipped"


def test_plan_and_report_round_trip():
    plan = build_plan(spot(120), parse(FULL), NOW, 90)
    again = Plan.from_dict(plan.to_dict())
    assert again.render() == plan.render()
    rep = DrainReport("spot-interruption", True, [StepReport("snapshot", "ok", 0.2)], {"ckpt": "snap-1"})
    assert DrainReport.from_dict(rep.to_dict()) == rep


def test_render_mentions_budgets_and_reasons():
    text = build_plan(spot(40), parse(FULL), NOW, 90).render()
    assert "reserved for persistence: 22.0 s" in text
    assert "cut to 3.0 s of 60.0 s" in text


def test_parse_timeout_stop():
    assert parse_timeout_stop("TimeoutStopUSec=1min 30s") == 90.0
    assert parse_timeout_stop("TimeoutStopUSec=45s") == 45.0
    assert parse_timeout_stop("TimeoutStopUSec=500ms") == 0.5
    assert parse_timeout_stop("TimeoutStopUSec=infinity") is None
    assert parse_timeout_stop("TimeoutStopUSec=") is None
    assert parse_timeout_stop("garbage") is None


def test_a_step_skipped_for_time_is_reconsidered_when_it_comes_up():
    cfg = parse(FULL)
    cfg.drain.workload.webhook = None
    plan = build_plan(spot(40), cfg, NOW, 90)
    # without a webhook, notify asks for 1 s only, so the wait gets the other 7 of the 8 s
    assert plan.step("notify").budget == 1.0
    assert plan.step("wait").budget == 7.0 and plan.step("wait").state == "cut"
    # with a webhook, 37 s left: usable 27, reserves 22, notify takes all 5, the wait none
    tight = build_plan(spot(37), parse(FULL), NOW, 90)
    assert tight.step("notify").budget == 5.0
    assert tight.step("wait").state == "skipped" and tight.step("wait").for_time
    # notify returned after 0.5 s: the wait gets the 4.5 s notify did not use
    assert tight.budget_at("wait", NOW + 0.5, done={"notify"}) == 4.5
    nothing = build_plan(spot(120), parse(""), NOW, 90)
    assert nothing.step("wait").structural_skip
    assert nothing.budget_at("wait", NOW) == 0.0


def test_examples_have_sensible_plans():
    import glob
    import os

    from agent.drain.planner import snapshot_volume_names

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    files = sorted(glob.glob(os.path.join(root, "examples", "*.toml")))
    assert files, "no examples/*.toml"
    for path in files:
        with open(path) as fh:
            cfg = parse(fh.read(), path)
        for kind, left in (("spot-interruption", 120), ("shutdown", None)):
            ev = Event(kind, "terminate" if kind == "spot-interruption" else "", None if left is None else NOW + left, "k", NOW)
            plan = build_plan(ev, cfg, NOW, 90)
            text = plan.render()
            assert text.startswith(f"drain plan for {kind}"), path
            snap = plan.step("snapshot")
            assert (snap.state != "skipped") == bool(snapshot_volume_names(cfg)), (path, text)
            assert all(s.state != "skipped" or s.reason for s in plan.steps), (path, text)
            assert plan.deadline - plan.now - plan.margin >= sum(s.budget for s in plan.steps) - 1e-6, (path, text)
