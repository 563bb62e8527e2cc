"""The gang checkpoint's pure rules: shard index, step directories, what a run manifest must hold,
and which files a shard restored at step S keeps (tests/engines/test_gang.py runs three agents)."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse
from agent.transfer.gang import (RUN_FORMAT, GangError, complete_steps, files_up_to, resolve_shard, step_of,
                                 validate_run_manifest)

CID = "20261203T101010.000000Z-abcdef"


def test_shard_from_config_or_environment():
    assert resolve_shard("2", 3, {}) == 2
    assert resolve_shard("env", 3, {"GROUP_RANK": "1"}) == 1
    assert resolve_shard("env", 3, {"SLURM_NODEID": "0", "NODE_RANK": "2"}) == 0
    assert resolve_shard("env:MY_RANK", 4, {"MY_RANK": " 3 "}) == 3


@pytest.mark.parametrize("spec,env,msg", [
    ("3", {}, "gang.shard = '3' is not a shard index in 0..2"),
    ("env", {}, "none of SLURM_NODEID, GROUP_RANK, NODE_RANK is set"),
    ("env:R", {"R": "-1"}, "R = '-1' is not a shard index"),
    ("env:R", {"R": "1x"}, "R = '1x' is not a shard index"),
])
def test_bad_shard_is_one_clear_line(spec, env, msg):
    with pytest.raises(GangError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve_shard(spec, 3, env)


def test_step_directories_and_their_marker():
    assert step_of("step-120/model.pt") == 120 and step_of("global_step7/x") == 7 and step_of("checkpoint-3/a/b") == 3
    assert step_of("latest") is None and step_of("logs/x") is None
    files = [{"path": p} for p in ("step-1/DONE", "step-1/w.bin", "step-2/w.bin", "step-3/DONE", "step-3/sub/DONE",
                                   "DONE", "notes/DONE", 7, {"path": None})]
    assert complete_steps(files, "DONE") == [1, 3]


def test_a_shard_restored_at_a_step_leaves_newer_steps_out():
    doc = {"id": CID, "files": [{"path": p} for p in ("step-1/w", "step-2/w", "step-3/w", "latest", "cfg/a")]}
    assert [e["path"] for e in files_up_to(doc, 2)["files"]] == ["step-1/w", "step-2/w", "latest", "cfg/a"]


def run_doc(**kw):
    doc = {"format": RUN_FORMAT, "step": 5, "size": 2, "shards": {"0": CID, "1": CID}}
    doc.update(kw)
    return doc


@pytest.mark.parametrize("doc,why", [
    (None, "not a gang run manifest"),
    (run_doc(format="x"), "not a gang run manifest"),
    (run_doc(step=6), "does not match its key"),
    (run_doc(step=True), "does not match"),
    (run_doc(size=3), "is not this gang's size"),
    (run_doc(shards={"0": CID}), "every shard"),
    (run_doc(shards={"0": CID, "1": "../../x"}), "not a checkpoint id"),
])
def test_run_manifest_validation(doc, why):
    assert why in (validate_run_manifest(doc, 5, 2) or "")


def test_valid_run_manifest():
    assert validate_run_manifest(run_doc(), 5, 2) is None


def test_gang_config():
    cfg = parse('[[checkpoints]]\ndir = "/c"\ns3 = "s3://bkt/c/"\nmarker = "DONE"\ngang = { size = 3, shard = "env:NODE_RANK" }\n')
    assert cfg.checkpoints[0].gang.size == 3
    with pytest.raises(ConfigError, match="checkpoints\\[0\\].marker: a gang checkpoint needs marker"):
        parse('[[checkpoints]]\ndir = "/c"\ns3 = "s3://bkt/c/"\ngang = { size = 3 }\n')
    with pytest.raises(ConfigError, match="gang.shard"):
        parse('[[checkpoints]]\ndir = "/c"\ns3 = "s3://bkt/c/"\nmarker = "D"\ngang = { size = 3, shard = "$RANK" }\n')
