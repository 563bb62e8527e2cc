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
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import yaml

from agent import metrics
from agent.config import MetricsSection
from agent.http_server import MetricsServer
from agent.status_socket import query_socket

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
    # The registry is process-wide: start from "no notice" whatever earlier tests recorded.
    metrics.NOTICE_ACTIVE.labels(kind="spot-interruption").set(0)
    metrics.DEADLINE.set(0)
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

    # Every dashboard query runs against the real server, and the notice panels show the notice.
    from tests.integration.test_prometheus_rules import _panel_exprs, grafana_to_promql

    answers = {where: prometheus.query(grafana_to_promql(expr)) for where, expr in _panel_exprs()}
    active = {r["metric"]["kind"]: float(r["value"][1]) for r in answers["Active notices A"]}
    assert active["spot-interruption"] == 1 and active["manual"] == 0
    left = answers["Time left before termination A"]
    assert len(left) == 1 and 0 < float(left[0]["value"][1]) <= 120
    states = {r["metric"]["state"] for r in answers["Agent state A"]}
    assert len(states) == 1, states  # exactly one state at a time (which one depends on earlier tests)


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


# -- the same, driving the real daemon and the IMDS simulator ----------------------------------------

def wait_port(port: int, proc: subprocess.Popen, what: str, log: str) -> None:
    def accepting() -> Optional[bool]:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {open(log).read()[-3000:]}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_for(f"{what} on port {port}", accepting, log=log)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def daemon(request, tmp_path, local_aws) -> Iterator[Dict[str, Any]]:
    """`spot-agent simulate serve` and `spot-agent run` as real processes, all on loopback.

    Yields once the daemon answers on its status socket. ``@pytest.mark.parametrize("daemon", [False],
    indirect=True)`` runs it with ``[metrics] enabled = false``.
    """
    metrics_enabled = getattr(request, "param", True)
    sim_port, metrics_port = free_port(), free_port()
    sim_log, daemon_log = str(tmp_path / "sim.log"), str(tmp_path / "daemon.log")
    procs: List[subprocess.Popen] = []
    try:
        with open(sim_log, "wb") as out:
            sim = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "serve", "--listen", f"127.0.0.1:{sim_port}",
                                    "--instance-id", "i-0ddddddddddddddd4"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(sim)
        wait_port(sim_port, sim, "the IMDS simulator", sim_log)
        config = tmp_path / "agent.toml"
        config.write_text(f"""
[agent]
state_dir = "{tmp_path / 'state'}"
socket = "{tmp_path / 'run' / 'agent.sock'}"
[imds]
endpoint = "http://127.0.0.1:{sim_port}"
poll_interval = 0.2
[aws]
region = "us-east-1"
endpoint_url = "{local_aws.url}"
[metrics]
enabled = {"true" if metrics_enabled else "false"}
listen = "127.0.0.1:{metrics_port}"
[drain.lifecycle]
enabled = false
""")
        os.chmod(config, 0o600)
        with open(daemon_log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(proc)
        sock_path = str(tmp_path / "run" / "agent.sock")

        def answering() -> Optional[bool]:
            if proc.poll() is not None:
                pytest.fail(f"the daemon exited with {proc.returncode}: {open(daemon_log).read()[-3000:]}")
            return True if query_socket(sock_path, timeout=1.0) else None

        wait_for("the daemon's status socket", answering, log=daemon_log)
        yield {"proc": proc, "config": str(config), "sim": f"http://127.0.0.1:{sim_port}", "metrics_port": metrics_port,
               "log": daemon_log}
    finally:
        for p in reversed(procs):
            stop_process(p)


def test_prometheus_scrapes_the_real_daemon_through_a_simulated_notice(tmp_path, daemon: Dict[str, Any]) -> None:
    base = f"http://127.0.0.1:{daemon['metrics_port']}"

    def ready() -> Optional[bool]:
        if daemon["proc"].poll() is not None:
            pytest.fail(f"the daemon exited with {daemon['proc'].returncode}: {open(daemon['log']).read()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                return True if resp.status == 200 else None
        except urllib.error.HTTPError as exc:
            assert exc.code == 503  # not ready yet: the only other answer allowed
            return None

    wait_for("the daemon's /readyz to turn 200", ready, log=daemon["log"])
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        assert resp.status == 200
    status = agent_cli("status", "--json", "--config", daemon["config"])
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["state"] == "ready" and doc["ready"] is True and doc["pid"] == daemon["proc"].pid
    assert doc["instance"]["instance_id"] == "i-0ddddddddddddddd4" and doc["notices"] == []

    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([ec2_target("i-0ddddddddddddddd4", daemon["metrics_port"])]))
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    gen = start_prometheus(prom_dir, fleet_job(str(targets)))
    prom = next(gen)
    try:
        expr = 'spot_agent_notice_active{kind="spot-interruption",instance="i-0ddddddddddddddd4"}'
        wait_for("the first scrape of the daemon", lambda: True if sample_value(prom, expr) == 0 else None, log=prom.log)
        assert sample_value(prom, 'spot_agent_state{state="ready",instance="i-0ddddddddddddddd4"}') == 1

        trigger = agent_cli("simulate", "trigger", "spot", "--endpoint", daemon["sim"])
        assert trigger.returncode == 0, trigger.stderr

        wait_for("the daemon's notice to reach Prometheus", lambda: True if sample_value(prom, expr) == 1 else None,
                 log=daemon["log"])
        deadline = sample_value(prom, 'spot_agent_termination_deadline_timestamp_seconds{instance="i-0ddddddddddddddd4"}')
        assert deadline is not None and deadline > time.time()

        def noticed() -> Optional[Dict[str, Any]]:
            result = agent_cli("status", "--json", "--config", daemon["config"])
            if result.returncode != 0:
                return None
            data = json.loads(result.stdout)
            return data if data["notices"] else None

        doc = wait_for("spot-agent status to show the notice", noticed, log=daemon["log"])
        assert doc["notices"][0]["kind"] == "spot-interruption" and doc["state"] in ("draining", "drained")
        assert abs(doc["deadline"] - deadline) < 1.0
    finally:
        gen.close()

    # Once the daemon has gone, status says so, with the state it left behind, and exits 3.
    stop_process(daemon["proc"])
    gone = agent_cli("status", "--json", "--config", daemon["config"])
    assert gone.returncode == 3, gone.stdout + gone.stderr
    last = json.loads(gone.stdout)
    assert last["running"] is False and last["last"]["state"] == "drained" and last["last"]["pid"] == daemon["proc"].pid


@pytest.mark.parametrize("daemon", [False], indirect=True)
def test_metrics_enabled_false_means_no_listener(daemon: Dict[str, Any]) -> None:
    def ready() -> Optional[Dict[str, Any]]:
        result = agent_cli("status", "--json", "--config", daemon["config"])
        doc = json.loads(result.stdout) if result.returncode == 0 else {}
        return doc if doc.get("state") == "ready" else None

    wait_for("the daemon to be ready", ready, log=daemon["log"])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon["metrics_port"]), timeout=2).close()
