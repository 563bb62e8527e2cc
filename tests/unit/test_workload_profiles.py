"""Profile resolution (pure): each profile's defaults, every key overriding them, the env file, the
notice document and the acknowledgement parser."""

from __future__ import annotations

import json

import pytest

from agent.config import parse
from agent.drain import profiles
from agent.drain.planner import build_plan, notify_targets, wait_conditions
from agent.drain.jobchannel import notice_document, parse_ack
from agent.events import Event

BASE = '[agent]\nsocket = "/run/sa/agent.sock"\n'


def cfg(workload: str = "", extra: str = ""):
    return parse(BASE + extra + "\n[drain.workload]\n" + workload)


def test_generic_is_the_behaviour_before_profiles():
    c = cfg('unit = "train.service"\n')
    r = profiles.for_config(c, "spot-interruption")
    assert (r.signal, r.kill_whom, r.conditions, r.mode) == ("SIGTERM", "main", ["process"], "all")
    assert r.notice_file == "/run/sa/notice.json" and r.ack_dir == "/run/sa/ack" and r.env_file == "/run/sa/workload.env"
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in r.env
    c = cfg('unit = "train.service"\nmarker = "/m/DONE"\n')
    assert wait_conditions(c, "spot-interruption") == ["marker"]


@pytest.mark.parametrize("name,signal,whom,conds,commit", [
    ("torchrun", "SIGTERM", "main", ["commit", "ack", "process"], ".metadata"),
    ("lightning", "SIGTERM", "all", ["ack", "process"], ""),
    ("huggingface", "SIGTERM", "all", ["commit", "ack", "process"], "trainer_state.json"),
])
def test_each_profile_has_its_defaults(name, signal, whom, conds, commit):
    c = cfg(f'profile = "{name}"\nunit = "train.service"\n',
            extra='[[checkpoints]]\ndir = "/mnt/ckpt"\ns3 = "s3://bucket/ck/"\n')
    r = profiles.for_config(c, "spot-interruption")
    assert (r.signal, r.kill_whom, r.conditions, r.mode, r.commit_file) == (signal, whom, conds, "any", commit)
    assert r.commit_dir == "/mnt/ckpt"
    assert r.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "61"  # the 60 s wait budget, and a second
    assert r.env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    assert r.env["SPOT_AGENT_CHECKPOINT_DIR"] == "/mnt/ckpt"


def test_every_default_can_be_overridden():
    c = cfg('profile = "torchrun"\nunit = "t.service"\nsignal = "USR1"\nkill_whom = "all"\n'
            'complete = ["ack"]\ncomplete_mode = "all"\ncommit_dir = "/x"\ncommit_file = "DONE"\n'
            'notice_file = "/n/notice.json"\nack_dir = "/n/acks"\nenv_file = "/n/w.env"\n'
            'checkpoint_timeout = 100\nenv = { PYTHONPATH = "", EXTRA = "1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT = "300" }\n')
    r = profiles.for_config(c, "spot-interruption")
    assert (r.signal, r.kill_whom, r.conditions, r.mode) == ("SIGUSR1", "all", ["ack"], "all")
    assert (r.commit_dir, r.commit_file, r.notice_file, r.ack_dir, r.env_file) == ("/x", "DONE", "/n/notice.json", "/n/acks", "/n/w.env")
    assert "PYTHONPATH" not in r.env and r.env["EXTRA"] == "1"
    assert r.env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "300"
    assert r.env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def test_torchrun_with_a_signal_it_does_not_forward_says_so():
    r = profiles.for_config(cfg('profile = "torchrun"\nunit = "t.service"\nsignal = "SIGUSR1"\n'))
    assert any("PET_SIGNALS_TO_HANDLE" in n and "orphans" in n for n in r.notes)


def test_conditions_that_cannot_hold_are_dropped_with_a_note():
    # torchrun without a commit dir: commit cannot hold; ack and the process still can
    r = profiles.for_config(cfg('profile = "torchrun"\nunit = "t.service"\n'))
    assert r.conditions == ["ack", "process"]
    r = profiles.for_config(cfg('complete = ["commit", "marker", "ack"]\n'))
    assert r.conditions == ["ack"]
    assert any(n.startswith("commit:") for n in r.notes) and any(n.startswith("marker:") for n in r.notes)
    assert wait_conditions(cfg('profile = "lightning"\nwait = "none"\n'), "spot-interruption") == []


def test_hooks_join_the_profile_conditions_for_their_event():
    c = cfg('profile = "lightning"\npidfile = "/run/t.pid"\n',
            extra='[[hooks]]\non = ["spot-interruption"]\ncommand = ["/bin/true"]\n')
    assert wait_conditions(c, "spot-interruption") == ["hooks", "ack", "process"]
    assert wait_conditions(c, "manual") == ["ack", "process"]
    assert notify_targets(c, "manual") == ["SIGTERM to the process in /run/t.pid and its descendants"]


def test_plan_text_says_any_for_any_mode():
    c = cfg('profile = "torchrun"\nunit = "t.service"\n',
            extra='[[checkpoints]]\ndir = "/mnt/ckpt"\ns3 = "s3://bucket/ck/"\n')
    plan = build_plan(Event("spot-interruption", "terminate", 1120.0, "k", 1000.0), c, 1000.0, 90.0,
                      volumes=[], stores=["s3://bucket/ck/"], lifecycle=False)
    wait = plan.step("wait")
    assert wait.detail == ("until a step in /mnt/ckpt commits with .metadata or the job's helper acknowledges "
                           "its checkpoint or the unit t.service exits")


@pytest.mark.parametrize("bad,where", [
    ('profile = "deepspeed"\n', "drain.workload.profile"),
    ('signal = "SIGNOPE"\n', "drain.workload.signal"),
    ('complete = ["exit"]\n', "drain.workload.complete[0]"),
    ('commit_file = "a/b"\n', "drain.workload.commit_file"),
    ('env = { "BAD-NAME" = "x" }\n', "drain.workload.env.BAD-NAME"),
    ('notice_file = "relative.json"\n', "drain.workload.notice_file"),
])
def test_bad_workload_keys_are_one_line_errors(bad, where):
    from agent.schema import ConfigError

    with pytest.raises(ConfigError) as info:
        cfg(bad)
    assert info.value.problems[0].path == where


def test_env_file_is_systemd_syntax():
    text = profiles.render_env({"B": 'say "hi"\\', "A": "1"})
    assert text.splitlines()[1:] == ['A="1"', 'B="say \\"hi\\"\\\\"']


def test_notice_document_shape():
    doc = notice_document("spot-interruption", "terminate", "spot:1", 1120.0, 1000.0, True, 1070.0,
                          {"dir": "/mnt/ckpt", "commit_file": ".metadata"})
    assert doc["seconds_left"] == 120.0 and doc["deadline_iso"] == "1970-01-01T00:18:40Z"
    assert doc["terminal"] and doc["save_by"] == 1070.0 and doc["format"] == 1
    assert json.loads(json.dumps(doc)) == doc
    assert notice_document("manual", "drain", "m", None, 1.0, True, None, {})["seconds_left"] is None


@pytest.mark.parametrize("raw,why", [
    (b"x" * 5000, "larger than"),
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1]", "format-1"),
    (json.dumps({"format": 1, "path": "rel", "time": 1.0, "pid": 5}).encode(), "absolute"),
    (json.dumps({"format": 1, "path": "/a\u0000b", "time": 1.0, "pid": 5}).encode(), "absolute"),
    (b'{"format": 1, "path": "/a", "time": NaN, "pid": 5}', "finite"),
    (json.dumps({"format": 1, "path": "/a", "time": 1.0, "pid": True}).encode(), "pid"),
    (json.dumps({"format": 1, "path": "/a", "time": 1.0, "pid": 5, "step": -1}).encode(), "step"),
    (json.dumps({"format": 1, "path": "/a", "time": 1.0, "pid": 5, "notice": ["x"]}).encode(), "notice"),
])
def test_acks_are_hostile_input(raw, why):
    ack, reason = parse_ack(raw, 1000)
    assert ack is None and why in reason


def test_a_good_ack():
    ack, why = parse_ack(json.dumps({"format": 1, "path": "/mnt/ckpt/step-9/", "notice": "spot:1", "time": 5.0,
                                     "pid": 42, "step": 9}).encode(), 1000)
    assert why == "" and (ack.path, ack.notice, ack.step, ack.uid) == ("/mnt/ckpt/step-9", "spot:1", 9, 1000)


def test_the_plan_carries_the_profile_notes():
    c = cfg('profile = "torchrun"\nunit = "t.service"\nsignal = "SIGUSR1"\ncomplete = ["marker", "process"]\n')
    plan = build_plan(Event("spot-interruption", "terminate", 1120.0, "k", 1000.0), c, 1000.0, 90.0,
                      volumes=[], stores=[], lifecycle=False)
    assert any(n.startswith("workload: marker: no marker set") for n in plan.notes)
    assert any("PET_SIGNALS_TO_HANDLE" in n for n in plan.notes)
    assert "workload:" in plan.render()
