"""READY waits for the non-background datasets, extending systemd's start timeout meanwhile."""

import hashlib

from tests.daemon_harness import AgentProcess, wait_file


def test_ready_only_after_the_dataset_is_local(aws, imds_sim, tmp_path):
    aws.s3.create_bucket(Bucket="data")
    files = {f"shard-{i:02d}.bin": bytes([i]) * (300_000 + i) for i in range(8)}
    for key, body in files.items():
        aws.s3.put_object(Bucket="data", Key=f"corpus/{key}", Body=body)
    dest = tmp_path / "data"
    config = f'''
[agent]
state_dir = "{tmp_path}/state"
socket = "{tmp_path}/state/agent.sock"
[imds]
endpoint = "{imds_sim.url}"
[aws]
region = "us-east-1"
endpoint_url = "{aws.url}"
[metrics]
enabled = false
[drain.lifecycle]
enabled = false
[transfer]
max_bandwidth = 1500000
[[datasets]]
source = "s3://data/corpus/"
dest = "{dest}"
'''
    a = AgentProcess(tmp_path, config)
    try:
        a.wait_ready(timeout=30)
        lines = a.notify.lines
        ready_at = lines.index("READY=1")
        assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in lines[:ready_at])
        assert any(line.startswith("STATUS=pre-warming s3://data/corpus/") for line in lines[:ready_at])
        # Everything is there, byte for byte, by the time READY is sent.
        for key, body in files.items():
            assert hashlib.sha256((dest / key).read_bytes()).digest() == hashlib.sha256(body).digest()
        status = wait_file(str(tmp_path / "state" / "status.json"), contains='"state": "done"')
        assert '"ready": true' in status
    finally:
        a.stop()
