"""Slurm's output as untrusted input (hostlists, squeue --json, scontrol show node) and the Slurm
commands the drain runs, through a recording runner (unit tests run no daemons; the same paths run
against a real slurmctld and two slurmd in tests/engines/test_slurm_engine.py)."""

from __future__ import annotations

import json
import os
from typing import List

import pytest

from agent.config import SlurmSection, parse
from agent.drain.planner import build_plan
from agent.events import Event
from agent.runner import Result
from agent.schedulers import REBALANCE_REASON, Schedulers
from agent.schedulers.slurm import (Slurm, SlurmJob, SlurmParseError, commit_path, drain_reason, expand_hostlist,
                                    parse_scontrol_node, parse_squeue_json, pending_commits)
from agent.state import StateStore

NOW = 1_900_000_000.0


def test_hostlist_expansion():
    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu-[01-03,7],login") == ["gpu-01", "gpu-02", "gpu-03", "gpu-7", "login"]
    assert expand_hostlist("") == [] and expand_hostlist("(null)") == []
    assert expand_hostlist("a[1-2]x") == ["a1x", "a2x"]


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[[1]]", "n[a-b]", "n[5-1]", "n[1-99999999]", "../etc", "n;rm", 7])
def test_hostlist_refuses_what_slurm_never_prints(bad):
    with pytest.raises(SlurmParseError):
        expand_hostlist(bad)  # type: ignore[arg-type]


def squeue(*jobs) -> str:
    return json.dumps({"meta": {}, "errors": [], "jobs": list(jobs)})


def job(jid, nodes="n[1-2]", state="RUNNING", **kw):
    return dict({"job_id": jid, "name": "train", "nodes": nodes, "job_state": state, "requeue": True,
                 "batch_host": "n1"}, **kw)


def test_squeue_running_jobs_on_this_node():
    text = squeue(job(1), job(2, nodes="n2"), job(3, state="PENDING", nodes=""), job(4, nodes="n[1,3]", state=["RUNNING"]))
    jobs = parse_squeue_json(text, "n1")
    assert [(j.job_id, j.nodes) for j in jobs] == [(1, ["n1", "n2"]), (4, ["n1", "n3"])]


def test_squeue_bad_entries_are_skipped_not_fatal():
    text = squeue(job(0), job(True), job("5"), job(6, nodes="n[1-"), "garbage", job(7, state=3), job({"number": 8}),
                  job(9, name=["x"], batch_host="../x"))
    jobs = parse_squeue_json(text, "n1")
    assert [j.job_id for j in jobs] == [8, 9]
    assert jobs[1].name == "" and jobs[1].batch_host == ""


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"jobs": {}}', '{"errors": []}'])
def test_squeue_document_that_is_not_squeue(text):
    with pytest.raises(SlurmParseError):
        parse_squeue_json(text, "n1")


def test_scontrol_node_with_a_reason_that_has_spaces():
    info = parse_scontrol_node("NodeName=n1 Arch=x86_64 State=IDLE+DRAIN Partitions=debug "
                               "Reason=spot-agent: spot-interruption/terminate, deadline 2030-03-17T17:48:40Z (120s) [root@2030]")
    assert info["State"] == "IDLE+DRAIN" and info["Reason"].startswith("spot-agent: spot-interruption/terminate")
    with pytest.raises(SlurmParseError):
        parse_scontrol_node("Node n1 not found")


def test_drain_reason_names_the_notice_and_deadline_and_stays_one_printable_line():
    r = drain_reason("spot-interruption", "terminate", NOW + 120, NOW)
    assert r == "spot-agent: spot-interruption/terminate, deadline 2030-03-17T17:48:40Z (120s)"
    assert "\n" not in drain_reason("manual\nx", "", None, NOW) and len(drain_reason("k" * 500, "", None, NOW)) <= 200


def test_commit_path_cannot_climb(tmp_path):
    j = SlurmJob(12, "t", ["n1"], "RUNNING")
    assert commit_path("/shared/{job_id}/{node}.done", j, "n1") == "/shared/12/n1.done"
    with pytest.raises(SlurmParseError):
        commit_path("/shared/{job_id}/{node}.done", j, "../../etc/passwd")


def test_pending_commits_refuses_links_and_old_files(tmp_path):
    tpl = str(tmp_path / "{job_id}-{node}.done")
    j = SlurmJob(5, "t", ["n1", "n2", "n3"], "RUNNING")
    (tmp_path / "5-n1.done").write_text("ok")
    os.symlink(str(tmp_path / "5-n1.done"), str(tmp_path / "5-n2.done"))  # a link the job planted: not a commit
    (tmp_path / "5-n3.done").write_text("old")
    old = os.stat(str(tmp_path / "5-n1.done")).st_mtime - 3600
    os.utime(str(tmp_path / "5-n3.done"), (old, old))
    missing = pending_commits(tpl, [j], since=os.stat(str(tmp_path / "5-n1.done")).st_mtime).missing
    assert [(n) for _, n, _ in missing] == ["n2", "n3"]


class Recorder:
    """Plays scontrol/squeue/scancel (no Slurm daemons in unit tests)."""

    def __init__(self, jobs=(), node_present=True, reason=""):
        self.calls: List[List[str]] = []
        self.jobs = list(jobs)
        self.node_present = node_present
        self.reason = reason
        self.fail = set()

    def run(self, argv, timeout=60.0, check=True, input=None):
        argv = list(argv)
        self.calls.append(argv)
        tool = os.path.basename(argv[0])
        if tool in self.fail:
            return Result(argv, 1, "", f"{tool}: error: boom", 0.0)
        if tool == "scontrol" and argv[1:3] == ["--oneliner", "show"]:
            if not self.node_present:
                return Result(argv, 1, "", "Node n1 not found", 0.0)
            return Result(argv, 0, f"NodeName=n1 State=IDLE+DRAIN Reason={self.reason}\n", "", 0.0)
        if tool == "squeue":
            return Result(argv, 0, squeue(*self.jobs), "", 0.0)
        return Result(argv, 0, "", "", 0.0)


class Clock:
    def __init__(self):
        self.now = NOW

    def time(self):
        return self.now


def make(tmp_path, rec, **slurm):
    text = "[slurm]\nnode = \"n1\"\nbin_dir = \"/usr/bin\"\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in slurm.items())
    cfg = parse(text)
    return cfg, Schedulers(cfg, rec, StateStore(str(tmp_path / "state.json")), Clock()).prepare()


def test_terminal_drains_signals_every_job_once_and_requeues(tmp_path):
    rec = Recorder(jobs=[job(7), job(8, nodes="n[1-4]")])
    cfg, s = make(tmp_path, rec, requeue=True, signal="SIGUSR1")
    assert s.active() == ["slurm"]
    record: dict = {}
    state, reason = s.terminal("spot-interruption", "terminate", NOW + 120, record)
    assert state == "ok", reason
    cmds = [c[1:] for c in rec.calls if os.path.basename(c[0]) in ("scontrol", "scancel") and c[1] != "--oneliner"]
    assert cmds[0] == ["update", "NodeName=n1", "State=DRAIN",
                       "Reason=spot-agent: spot-interruption/terminate, deadline 2030-03-17T17:48:40Z (120s)"]
    assert cmds[1:] == [["--signal=USR1", "--full", "7"], ["--signal=USR1", "--full", "8"]]
    assert record["signalled"] == [7, 8]
    # a resumed drain (the agent restarted) never signals a job twice
    rec.calls.clear()
    s.terminal("spot-interruption", "terminate", NOW + 120, record)
    assert not [c for c in rec.calls if os.path.basename(c[0]) == "scancel"]
    assert s.requeue(record) == ("ok", "job 7 requeued; job 8 requeued")
    assert s.requeue(record) == ("ok", "no jobs to requeue")


def test_a_failing_command_is_reported_and_the_rest_still_runs(tmp_path):
    rec = Recorder(jobs=[job(7)])
    rec.fail.add("scancel")
    _, s = make(tmp_path, rec)
    state, reason = s.terminal("spot-interruption", "terminate", NOW + 120, {})
    assert state == "failed" and "scancel --signal=USR1 --full 7 exited 1: scancel: error: boom" in reason
    assert "node n1 drained" in reason


def test_not_a_slurm_node_does_nothing(tmp_path):
    rec = Recorder(node_present=False)
    _, s = make(tmp_path, rec)
    assert s.active() == [] and s.terminal("spot-interruption", "", None, {}) == ("ok", "")


def test_wait_commits_names_the_late_job_and_node(tmp_path):
    tpl = str(tmp_path / "{job_id}" / "{node}.done")
    rec = Recorder(jobs=[job(9)])
    _, s = make(tmp_path, rec, commit_file=tpl)
    record: dict = {}
    s.terminal("spot-interruption", "terminate", NOW + 120, record)
    record["signalled_at"] = 0.0
    os.makedirs(str(tmp_path / "9"))
    (tmp_path / "9" / "n1.done").write_text("")
    met, text = s.wait_commits(record, 0.2, 0.0)
    assert not met and text == f"slurm: late: job 9 on n2: no commit file {tmp_path}/9/n2.done"
    (tmp_path / "9" / "n2.done").write_text("")
    assert s.wait_commits(record, 0.2, 0.0) == (True, "slurm: 2 commit file(s) of 1 job(s) written")


def test_rebalance_drains_and_resumes_only_our_own_drain(tmp_path):
    rec = Recorder(reason=REBALANCE_REASON + " [root@now]")
    _, s = make(tmp_path, rec, rebalance_drain=True, rebalance_resume_after=3600.0)
    assert s.rebalance("rebalance-recommendation") == ["slurm: node n1 drained"]
    assert s._timer is not None
    assert s.resume_if_quiet() == (True, "node n1 resumed")
    assert ["update", "NodeName=n1", "State=RESUME"] in [c[1:] for c in rec.calls]
    rec.reason = "admin: bad DIMM"
    assert s.resume_if_quiet()[0] is False
    s.interrupted()
    assert s._timer is None and s.resume_if_quiet() == (False, "an interruption followed")
    s.close()


def test_plan_has_scheduler_first_and_requeue_after_upload():
    cfg = parse("[slurm]\nrequeue = true\ncommit_file = \"/c/{job_id}/{node}\"\n"
                "[[checkpoints]]\ndir = \"/ck\"\ns3 = \"s3://bkt/ck/\"\n")
    ev = Event("spot-interruption", "terminate", NOW + 120, "k", NOW)
    plan = build_plan(ev, cfg, NOW, 90, volumes=[], stores=["ck"], lifecycle=False, schedulers=["slurm"])
    assert plan.names() == ["scheduler", "notify", "wait", "snapshot", "upload", "requeue", "retention", "lifecycle"]
    assert plan.step("wait").state != "skipped" and "commit_file" not in plan.step("wait").detail
    assert "every node of each job writes /c/{job_id}/{node}" in plan.step("wait").detail
    plain = build_plan(ev, cfg, NOW, 90, volumes=[], stores=["ck"], lifecycle=False)
    assert plain.names() == ["notify", "wait", "snapshot", "upload", "retention", "lifecycle"]


def test_slurm_conf_reaches_the_commands():
    sec = SlurmSection(node="n1", conf="/etc/other/slurm.conf")
    from agent.runner import Runner

    assert Slurm(sec, Runner()).runner.env == {"SLURM_CONF": "/etc/other/slurm.conf"}
