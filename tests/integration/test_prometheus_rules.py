"""promtool on the shipped Prometheus files: rule unit tests, the fleet scrape config, dashboard PromQL."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROM_DIR = os.path.join(ROOT, "packaging", "prometheus")


def promtool(*args: str, cwd: str = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("promtool") or "promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_fail_when_an_alert_is_broken(tmp_path) -> None:
    """The rule tests can fail: with CheckpointStale's threshold moved, the 40m case no longer fires."""
    with open(os.path.join(PROM_DIR, "alerts.yml"), encoding="utf-8") as fh:
        broken = fh.read().replace("spot_agent_checkpoint_last_commit_timestamp_seconds > 1800", "spot_agent_checkpoint_last_commit_timestamp_seconds > 99999")
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(os.path.join(PROM_DIR, "alerts_test.yml"), tmp_path / "alerts_test.yml")
    result = promtool("test", "rules", "alerts_test.yml", cwd=str(tmp_path))
    assert result.returncode != 0
    assert "CheckpointStale" in result.stdout + result.stderr


def test_rules_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_scrape_config_checks() -> None:
    result = promtool("check", "config", "scrape-ec2.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout
    with open(os.path.join(PROM_DIR, "scrape-ec2.yml"), encoding="utf-8") as fh:
        config = yaml.safe_load(fh)
    job = config["scrape_configs"][0]
    assert job["job_name"] == "spot-agent" and job["ec2_sd_configs"][0]["port"] == 8947
    assert any("__meta_ec2_tag_" in " ".join(r.get("source_labels", [])) for r in job["relabel_configs"])


def _panel_exprs():
    with open(os.path.join(PROM_DIR, "grafana-dashboard.json"), encoding="utf-8") as fh:
        dash = json.load(fh)
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield f"{panel['title']} {target['refId']}", target["expr"]
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            yield f"annotation {ann['name']}", ann["expr"]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts, as Grafana does before it queries."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "1m")
    return re.sub(r"\$\{?(job|instance)\}?", ".*", expr)


def test_every_dashboard_expression_is_valid_promql(tmp_path) -> None:
    rules = [{"record": f"dashboard:panel_{i}", "expr": grafana_to_promql(expr)} for i, (_, expr) in enumerate(_panel_exprs())]
    assert len(rules) > 20
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # And the check can fail: a syntax error is caught.
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [{"record": "x:y", "expr": "rate(spot_agent_x[5m]"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0
