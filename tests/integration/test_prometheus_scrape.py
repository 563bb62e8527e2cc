"""A real Prometheus server (Debian `prometheus`) scrapes the agent on loopback.

It runs the shipped scrape job (packaging/prometheus/scrape-ec2.yml) with its relabeling intact; only
the discovery is swapped: ec2_sd_configs cannot run without AWS, so a file_sd target group carries
the same ``__meta_ec2_*`` labels EC2 discovery would produce. It also loads the shipped alerts.yml.
Then a notice is set and the query for the active-notice metric must turn 1, and the alert fire.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import yaml

from agent import metrics
from agent.config import MetricsSection
from agent.http_server import MetricsServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROM_DIR = os.path.join(ROOT, "packaging", "prometheus")
WAIT = 45.0  # seconds; the first sample shows about 5 s after start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Optional[Any]], timeout: float = WAIT, log: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value is not None:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(0.25)
    tail = ""
    if log and os.path.exists(log):
        with open(log, encoding="utf-8", errors="replace") as fh:
            tail = "".join(fh.readlines()[-20:])
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last error: {last_error})\n{tail}")


class Prometheus:
    def __init__(self, url: str, log: str) -> None:
        self.url = url
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            doc = json.load(resp)
        if doc.get("status") != "success":
            raise ValueError(f"{path}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> List[Dict[str, Any]]:
        return self.api("query", query=expr)["result"]


def fleet_job(targets_file: str) -> Dict[str, Any]:
    """The shipped spot-agent job with EC2 discovery swapped for a file carrying the same meta labels."""
    with open(os.path.join(PROM_DIR, "scrape-ec2.yml"), encoding="utf-8") as fh:
        shipped = yaml.safe_load(fh)
    job = copy.deepcopy(shipped["scrape_configs"][0])
    assert "ec2_sd_configs" in job
    del job["ec2_sd_configs"]
    job["file_sd_configs"] = [{"files": [targets_file], "refresh_interval": "1s"}]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    return job


def ec2_target(instance_id: str, port: int, **tags: str) -> Dict[str, Any]:
    labels = {
        "__meta_ec2_instance_id": instance_id,
        "__meta_ec2_instance_state": "running",
        "__meta_ec2_private_ip": "127.0.0.1",
        "__meta_ec2_availability_zone": "us-east-1a",
        "__meta_ec2_instance_type": "g5.xlarge",
        "__meta_ec2_instance_lifecycle": "spot",
        "__meta_ec2_tag_Name": f"trainer-{instance_id}",
        "__meta_ec2_tag_aws_autoscaling_groupName": "trainers",
        "__meta_ec2_tag_spot_agent": "true",
        "__meta_ec2_tag_spot_agent_metrics_port": str(port),
    }
    labels.update(tags)
    return {"targets": [f"127.0.0.1:{port}"], "labels": labels}


@pytest.fixture
def agent_server() -> Iterator[MetricsServer]:
    srv = MetricsServer(MetricsSection(listen="127.0.0.1:0"), lambda: True, lambda: True).start()
    try:
        yield srv
    finally:
        srv.stop()
        metrics.NOTICE_ACTIVE.labels(kind="spot-interruption").set(0)
        metrics.DEADLINE.set(0)


def start_prometheus(tmp_path, job: Dict[str, Any]) -> Iterator[Prometheus]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [os.path.join(PROM_DIR, "alerts.yml")],
        "scrape_configs": [job],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    check = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = str(tmp_path / "prometheus.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([shutil.which("prometheus") or "prometheus", f"--config.file={config_path}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        def ready() -> Optional[bool]:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}: {open(log).read()[-2000:]}")
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                return True if resp.status == 200 else None

        wait_for("prometheus /-/ready", ready, log=log)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def prometheus(tmp_path, agent_server: MetricsServer) -> Iterator[Prometheus]:
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([
        ec2_target("i-0aaaaaaaaaaaaaaa1", agent_server.port, __meta_ec2_tag_spot_agent_label_team="ml"),
        ec2_target("i-0bbbbbbbbbbbbbbb2", agent_server.port, __meta_ec2_tag_spot_agent="off"),
        ec2_target("i-0ccccccccccccccc3", agent_server.port, __meta_ec2_instance_state="stopped"),
    ]))
    yield from start_prometheus(tmp_path, fleet_job(str(targets)))


def sample_value(prom: Prometheus, expr: str) -> Optional[float]:
    result = prom.query(expr)
    if len(result) != 1:
        return None
    return float(result[0]["value"][1])


def test_prometheus_sees_the_notice_and_fires_the_alert(prometheus: Prometheus) -> None:
    expr = 'spot_agent_notice_active{kind="spot-interruption",job="spot-agent"}'
    # Before the notice: scraped, and 0 (the series exists before any notice, so alerts can rely on it).
    wait_for("the first scrape (notice metric at 0)", lambda: True if sample_value(prometheus, expr) == 0 else None, log=prometheus.log)

    metrics.DEADLINE.set(time.time() + 120)
    metrics.NOTICE_ACTIVE.labels(kind="spot-interruption").set(1)  # what the notice watcher records

    wait_for("the notice metric to read 1", lambda: True if sample_value(prometheus, expr) == 1 else None, log=prometheus.log)
    result = prometheus.query(expr)
    labels = result[0]["metric"]
    # The shipped relabeling: instance id as instance, EC2 facts and tags as labels.
    assert labels["instance"] == "i-0aaaaaaaaaaaaaaa1"
    assert labels["lifecycle"] == "spot" and labels["asg"] == "trainers" and labels["team"] == "ml"
    assert labels["availability_zone"] == "us-east-1a" and labels["instance_type"] == "g5.xlarge"

    def firing() -> Optional[Dict[str, Any]]:
        for alert in prometheus.api("alerts")["alerts"]:
            if alert["labels"]["alertname"] == "SpotInterruptionNotice" and alert["state"] == "firing":
                return alert
        return None

    alert = wait_for("SpotInterruptionNotice to fire", firing, log=prometheus.log)
    assert alert["labels"]["instance"] == "i-0aaaaaaaaaaaaaaa1"
    assert "EC2 will interrupt i-0aaaaaaaaaaaaaaa1 at 20" in alert["annotations"]["description"]


def test_relabeling_keeps_only_running_opted_in_instances(prometheus: Prometheus) -> None:
    def targets() -> Optional[Dict[str, Any]]:
        data = prometheus.api("targets", state="any")
        if data["activeTargets"] and data["activeTargets"][0]["health"] == "up":
            return data
        return None

    data = wait_for("the target to be up", targets, log=prometheus.log)
    active = data["activeTargets"]
    assert [t["labels"]["instance"] for t in active] == ["i-0aaaaaaaaaaaaaaa1"]
    assert active[0]["scrapeUrl"].endswith("/metrics") and "127.0.0.1:" in active[0]["scrapeUrl"]
    dropped = {t["discoveredLabels"]["__meta_ec2_instance_id"] for t in data["droppedTargets"]}
    assert dropped == {"i-0bbbbbbbbbbbbbbb2", "i-0ccccccccccccccc3"}
    # The alert rules loaded into a real server, with no evaluation errors.
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"SpotInterruptionNotice", "DrainFailed", "CheckpointStale", "DatasetSyncFailed", "IMDSUnreachable", "AgentDown"} <= set(rules)

    def evaluated() -> Optional[bool]:
        current = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        if all(r.get("lastEvaluation", "").startswith("0001") is False for r in current.values()):
            bad = {n: r.get("lastError") for n, r in current.items() if r.get("health") != "ok"}
            assert not bad, bad
            return True
        return None

    wait_for("every rule to evaluate", evaluated, log=prometheus.log)
