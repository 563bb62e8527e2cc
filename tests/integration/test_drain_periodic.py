"""The drain never waits behind a periodic upload (issue 12): a periodic upload stuck on a slow S3
holds the checkpoint store; the drain stops it between parts, takes over, commits a complete
checkpoint of its own and returns before its deadline. Real Drainer, real CheckpointStore, moto over
HTTP behind the project's fault proxy (the periodic upload's parts in flight are held for 10 s; the drain has 8 s)."""

from __future__ import annotations

import threading
import time

from agent.clock import Clock
from agent.config import parse
from agent.drain.executor import Drainer
from agent.events import Event
from agent.identity import InstanceIdentity
from agent.runner import Runner
from agent.sim.faultproxy import Fault, FaultProxy
from agent.state import StateStore
from agent.transfer.checkpoints import CheckpointStore
from tests.integration.transfer_helpers import client, tree_hashes

BUCKET = "periodic-bucket"
MiB = 1024 * 1024
HELD = 10.0  # seconds the periodic upload's parts in flight are held by the proxy
LEFT = 8.0  # seconds the drain has


def test_a_drain_during_a_slow_periodic_upload_takes_over_within_its_deadline(aws, tmp_path):
    aws.s3.create_bucket(Bucket=BUCKET)
    ckdir = tmp_path / "ckpt"
    (ckdir / "step-7").mkdir(parents=True)
    with open(ckdir / "step-7" / "model.pt", "wb") as fh:
        for i in range(3):  # 3 parts of 5 MiB
            fh.write(bytes([i]) * (5 * MiB))
    (ckdir / "step-7" / "extra.pt").write_bytes(b"e" * 1000)
    want = tree_hashes(str(ckdir))
    cfg = parse(f'''
[agent]
state_dir = "{tmp_path}/state"
[aws]
region = "us-east-1"
endpoint_url = "{aws.url}"
[transfer]
concurrency = 2
part_size = 5242880
multipart_threshold = 5242880
[drain]
shutdown_budget = 30
[drain.workload]
wait = "none"
[drain.lifecycle]
enabled = false
[[checkpoints]]
dir = "{ckdir}"
s3 = "s3://{BUCKET}/run/"
interval = 300
settle = 0
''')
    faults = [Fault("delay", method="PUT", query_contains="partNumber", nth={1, 2}, seconds=HELD)]
    with FaultProxy(aws.url, faults) as proxy:
        store = CheckpointStore(client(proxy.url), cfg.checkpoints[0], cfg.transfer, cfg.agent.state_dir)
        identity = InstanceIdentity("i-0123456789abcdef0", "m5.large", "us-east-1a", "us-east-1")
        drainer = Drainer(cfg, aws, identity, StateStore(str(tmp_path / "state" / "drain.json")), Runner(), Clock(),
                          lambda: {}, [store])
        periodic = {}
        t = threading.Thread(target=lambda: periodic.update(r=store.upload(reason="interval")))
        t.start()
        end = time.time() + 10
        while sum(1 for r in proxy.requests if r.fault == "delay") < 2 and time.time() < end:
            time.sleep(0.02)
        assert sum(1 for r in proxy.requests if r.fault == "delay") == 2, "the periodic upload did not start"
        now = time.time()
        report = drainer.run(Event("spot-interruption", "terminate", now + LEFT, "spot:periodic", now))
        returned = time.time()
        t.join(HELD + 10)
    assert returned < now + LEFT, f"the drain returned {returned - now - LEFT:.1f}s after its deadline"
    upload = report.step("upload")
    assert upload.state == "ok", report.steps
    cid = report.checkpoint_ids[store.name]
    # The drain's checkpoint is complete: every file, and a restore gives back the same tree.
    latest = store.latest()
    assert latest["id"] == cid and sorted(e["path"] for e in latest["files"]) == ["step-7/extra.pt", "step-7/model.pt"]
    fresh = CheckpointStore(aws.s3, cfg.checkpoints[0].__class__(dir=str(tmp_path / "restored"), s3=f"s3://{BUCKET}/run/"),
                            cfg.transfer, str(tmp_path / "state2"))
    rr = fresh.restore()
    assert rr.restored and rr.checkpoint_id == cid, rr.error
    assert tree_hashes(str(tmp_path / "restored")) == want
    # The periodic upload stopped without committing, and left no multipart upload behind.
    assert not t.is_alive() and periodic["r"].preempted and not periodic["r"].committed, periodic
    assert store.committed_ids() == [cid]
    assert not aws.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
