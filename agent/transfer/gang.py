"""Gang checkpoints: one checkpoint series saved by N nodes, restored only at a step every node committed.

A distributed checkpoint is usable only when every shard saved the same step. Each node's agent
commits its own shard exactly as a single-node checkpoint (``CheckpointStore``, under
``<s3>/shards/<k>/``); the gang layer adds two small records next to them::

    <s3>/gang/shards/<step>/<k>.json    shard k committed step <step> in manifest <id>
    <s3>/gang/steps/<step>.json         the run-level manifest: all N shards of <step>, with their ids

A step is a top-level directory of the checkpoint dir whose name ends in its number (``step-1200``,
``checkpoint-1200``, ``global_step1200``) and that holds the checkpoint's ``marker`` in the committed
manifest. After each commit, the agent records the steps that manifest completes and, for each, lists
the shard records; the agent that sees all N writes the run-level manifest with an S3 conditional
write (``If-None-Match: *``), so two agents racing for it can never overwrite each other. The nodes
that did not get the notice upload their shard through their normal offload (the scheduler signalled
their job, so it saved), and whichever commit completes the step writes the run manifest.

Restore (a replacement node) takes the newest step that has a run-level manifest and restores its
own shard's manifest of that step, leaving out any newer step directories in it; a step without a
run-level manifest (a shard missing) is never restored, and an older complete step is used instead.
Everything read back from S3 is validated first (the prefix may be writable by the job).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from botocore.exceptions import ClientError

from agent.transfer.checkpoints import ID_RE, CheckpointStore, CommitResult, RestoreResult, precondition_failed
from agent.transfer.keys import split_s3_url

log = logging.getLogger(__name__)

RUN_FORMAT = "spot-agent-gang/1"
SHARD_FORMAT = "spot-agent-gang-shard/1"
STEP_DIR_RE = re.compile(r"^[A-Za-z_.-]{0,64}?(\d{1,12})$")
SHARD_ENV = ("SLURM_NODEID", "GROUP_RANK", "NODE_RANK")
MAX_RECORDED = 256  # steps remembered as recorded (older ones are never re-recorded anyway)


class GangError(ValueError):
    """A gang setting that cannot work here (one line, names what is wrong)."""


def resolve_shard(spec: str, size: int, env: Mapping[str, str]) -> int:
    """This node's shard index from ``gang.shard``: a number, ``env:NAME`` or ``env`` (the first of
    SLURM_NODEID, GROUP_RANK, NODE_RANK that is set)."""
    if spec.isdigit():
        value, where = spec, "gang.shard"
    else:
        names = [spec[4:]] if spec.startswith("env:") else list(SHARD_ENV)
        found = [(n, env[n]) for n in names if env.get(n, "").strip()]
        if not found:
            raise GangError(f"gang.shard = {spec!r}: none of {', '.join(names)} is set in the agent's environment")
        where, value = found[0]
        value = value.strip()
    if not value.isdigit() or not 0 <= int(value) < size:
        raise GangError(f"{where} = {value!r} is not a shard index in 0..{size - 1}")
    return int(value)


def step_of(path: str) -> Optional[int]:
    """The step number of a manifest path's top-level directory, or None (not in a step directory)."""
    if "/" not in path:
        return None
    m = STEP_DIR_RE.match(path.split("/", 1)[0])
    return int(m.group(1)) if m else None


def complete_steps(files: Sequence[Mapping[str, Any]], marker: str) -> List[int]:
    """Steps whose directory holds the marker in this manifest's file list (pure)."""
    out = set()
    for e in files:
        path = e.get("path") if isinstance(e, Mapping) else None
        if not isinstance(path, str) or path.count("/") != 1:
            continue
        top, name = path.split("/")
        s = step_of(path)
        if s is not None and name == marker:
            out.add(s)
    return sorted(out)


def files_up_to(doc: Dict[str, Any], step: int) -> Dict[str, Any]:
    """The manifest with the files of newer step directories left out: a shard restored at ``step``
    must not bring back a step that the other shards may not have."""
    files = [e for e in doc.get("files", []) if not isinstance(e, Mapping) or step_of(str(e.get("path", ""))) is None
             or (step_of(str(e.get("path", ""))) or 0) <= step]
    return dict(doc, files=files)


def validate_run_manifest(doc: Any, step: int, size: int) -> Optional[str]:
    """Why a run-level manifest must not be used, or None."""
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        return "not a gang run manifest"
    if doc.get("step") != step or isinstance(doc.get("step"), bool):
        return f"step {doc.get('step')!r} does not match its key ({step})"
    if doc.get("size") != size:
        return f"size {doc.get('size')!r} is not this gang's size ({size})"
    shards = doc.get("shards")
    if not isinstance(shards, dict) or sorted(shards) != sorted(str(k) for k in range(size)):
        return "does not name every shard exactly once"
    for k, cid in shards.items():
        if not isinstance(cid, str) or not ID_RE.match(cid):
            return f"shard {k}: {cid!r} is not a checkpoint id"
    return None


def _step_key(step: int) -> str:
    return f"{step:012d}"


class GangStore:
    """A :class:`CheckpointStore` for this node's shard, plus the gang's records. Same interface as
    the store (``name``, ``upload``, ``restore``, ``ck``), so the daemon and the drain use it as one."""

    def __init__(self, s3: Any, ck: Any, transfer: Any, state_dir: str, env: Optional[Mapping[str, str]] = None,
                 name: str = "") -> None:
        assert ck.gang is not None
        self.s3 = s3
        self.ck = ck
        self.size = ck.gang.size
        self.shard = resolve_shard(ck.gang.shard, self.size, os.environ if env is None else env)
        self.bucket, self.prefix = split_s3_url(ck.s3)
        shard_ck = dataclasses.replace(ck, s3=f"s3://{self.bucket}/{self.prefix}shards/{self.shard:05d}/")
        self.inner = CheckpointStore(s3, shard_ck, transfer, state_dir, name=name)
        self.inner.protected = self.protected_ids
        self.name = self.inner.name
        self.state = self.inner.state

    # -- keys ---------------------------------------------------------------------------------------
    def shard_record_key(self, step: int, shard: int) -> str:
        return f"{self.prefix}gang/shards/{_step_key(step)}/{shard:05d}.json"

    def run_key(self, step: int) -> str:
        return f"{self.prefix}gang/steps/{_step_key(step)}.json"

    # -- upload -------------------------------------------------------------------------------------
    def preempt(self) -> bool:
        return self.inner.preempt()

    def upload(self, deadline: Optional[float] = None, reason: str = "", settled: bool = False,
               preempt: bool = False) -> CommitResult:
        res = self.inner.upload(deadline=deadline, reason=reason, settled=settled, preempt=preempt)
        if res.committed:
            try:
                done = self.after_commit(res.checkpoint_id)
                if done:
                    log.info("gang %s: run-level manifest written for step(s) %s", self.ck.s3, ", ".join(map(str, done)))
            except Exception as exc:  # noqa: BLE001 - the shard is committed; another commit completes the step
                log.warning("gang %s: shard %d committed, but its step records failed: %s", self.ck.s3, self.shard, exc)
        return res

    def after_commit(self, cid: str) -> List[int]:
        """Record the steps manifest ``cid`` completes for this shard; write the run-level manifest of
        each step all N shards have. Returns the steps whose run manifest this call wrote."""
        doc = self.inner._read_manifest(cid)
        if doc is None:
            return []
        recorded = set(self.state.get("gang", {}).get("recorded", []))
        written = []
        for step in complete_steps(doc["files"], self.ck.marker):
            if step not in recorded:
                body = {"format": SHARD_FORMAT, "step": step, "shard": self.shard, "size": self.size, "manifest": cid,
                        "created": time.time()}
                self._put_if_absent(self.shard_record_key(step, self.shard), body)
                recorded.add(step)
            if self.try_complete(step):
                written.append(step)
        self.state.update("gang", recorded=sorted(recorded)[-MAX_RECORDED:])
        return written

    def try_complete(self, step: int) -> bool:
        """Write the run-level manifest of ``step`` if all N shards recorded it and nobody did yet."""
        shards = self.shard_records(step)
        if len(shards) != self.size:
            return False
        body = {"format": RUN_FORMAT, "step": step, "size": self.size, "created": time.time(), "by_shard": self.shard,
                "shards": {str(k): shards[k] for k in sorted(shards)}}
        return self._put_if_absent(self.run_key(step), body)

    def shard_records(self, step: int) -> Dict[int, str]:
        """shard index -> manifest id, for the valid shard records of ``step``."""
        out: Dict[int, str] = {}
        prefix = f"{self.prefix}gang/shards/{_step_key(step)}/"
        for key in self._list(prefix):
            name = key[len(prefix):]
            if not re.match(r"^\d{5}\.json$", name) or int(name[:5]) >= self.size:
                continue
            doc = self._get_json(key)
            if (isinstance(doc, dict) and doc.get("format") == SHARD_FORMAT and doc.get("step") == step
                    and doc.get("shard") == int(name[:5]) and isinstance(doc.get("manifest"), str) and ID_RE.match(doc["manifest"])):
                out[int(name[:5])] = doc["manifest"]
        return out

    def complete_steps(self) -> List[int]:
        """Steps with a run-level manifest key, oldest first (validated when read)."""
        prefix = f"{self.prefix}gang/steps/"
        out = []
        for key in self._list(prefix):
            name = key[len(prefix):]
            if re.match(r"^\d{12}\.json$", name):
                out.append(int(name[:12]))
        return sorted(out)

    def protected_ids(self) -> set:
        """This shard's manifests that the newest ``keep`` complete steps use: retention keeps them, or
        a restore could find a complete step whose shard is gone."""
        out = set()
        for step in self.complete_steps()[-self.ck.keep:]:
            doc = self._get_json(self.run_key(step))
            if validate_run_manifest(doc, step, self.size) is None:
                out.add(doc["shards"][str(self.shard)])
        return out

    # -- restore ------------------------------------------------------------------------------------
    def restore(self) -> RestoreResult:
        """Restore this shard at the newest step every shard committed (never an incomplete one)."""
        t0 = time.monotonic()
        skipped: List[str] = []
        for step in reversed(self.complete_steps()):
            doc = self._get_json(self.run_key(step))
            why = validate_run_manifest(doc, step, self.size)
            if why:
                skipped.append(f"step {step}: {why}")
                continue
            cid = doc["shards"][str(self.shard)]
            shard_doc = self.inner._read_manifest(cid)
            if shard_doc is None:
                skipped.append(f"step {step}: shard {self.shard}'s manifest {cid} is unreadable")
                continue
            if skipped:
                log.warning("gang %s: restoring step %d; skipped newer: %s", self.ck.s3, step, "; ".join(skipped))
            res = self.inner.restore_doc(files_up_to(shard_doc, step))
            res.seconds = time.monotonic() - t0
            self.state.update("gang", restored_step=step)
            return res
        error = f"no complete gang step under {self.ck.s3}" + (f" ({'; '.join(skipped)})" if skipped else "")
        # A checkpoint id only when something was there but could not be used: a first boot is not an error.
        return RestoreResult(False, checkpoint_id="gang" if skipped else "", error=error)

    # -- S3 helpers ---------------------------------------------------------------------------------
    def _list(self, prefix: str) -> List[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", ()))
        return out

    def _get_json(self, key: str) -> Any:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read(1024 * 1024 + 1)
        except ClientError:
            return None
        if len(body) > 1024 * 1024:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def _put_if_absent(self, key: str, body: Dict[str, Any]) -> bool:
        """A conditional write (If-None-Match: *): True when ours landed, False when the key existed."""
        data = json.dumps(body, sort_keys=True).encode()
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json", IfNoneMatch="*")
            return True
        except ClientError as exc:
            if precondition_failed(exc):
                return False
            raise


def make_store(s3: Any, ck: Any, transfer: Any, state_dir: str, env: Optional[Mapping[str, str]] = None) -> Any:
    """The store for one ``[[checkpoints]]`` entry: a gang's shard store, or a plain checkpoint store."""
    if getattr(ck, "gang", None) is not None:
        return GangStore(s3, ck, transfer, state_dir, env=env)
    return CheckpointStore(s3, ck, transfer, state_dir)
