"""The metric catalogue against Prometheus naming rules, the docs (docs/metrics.md), the dashboard and the alert rules.

Pure file and registry checks: a metric renamed in agent/metrics.py without updating the rules, the
dashboard or the docs fails here, not at 3 a.m. when an alert silently never fires.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import yaml

from agent import metrics
from tests import docs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROM_DIR = os.path.join(ROOT, "packaging", "prometheus")
NAME_RE = re.compile(r"\b(?:spot_agent|process)_[A-Za-z0-9_]*")

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def families() -> List[Tuple[str, str, str]]:
    """(family name, type, documentation) for everything REGISTRY exports, including scrape-time collectors."""
    return [(f.name, f.type, f.documentation) for f in metrics.REGISTRY.collect()]


def exported_names() -> Set[str]:
    """Every sample name a scrape can contain, whether or not a labelled child exists yet."""
    out: Set[str] = set()
    for name, mtype, _ in families():
        for suffix in SUFFIXES.get(mtype, ("",)):
            out.add(name + suffix)
    return out


def documented_name(name: str, mtype: str) -> str:
    """The name an operator types: counters with _total, info with _info."""
    return name + {"counter": "_total", "info": "_info"}.get(mtype, "")


def readme_section() -> str:
    """The metrics page of the docs, whose reference table the tests below read."""
    return docs.metrics_reference()


def rule_exprs() -> Iterator[Tuple[str, str]]:
    with open(os.path.join(PROM_DIR, "alerts.yml"), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    for group in doc["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule.get("record"), rule["expr"]
            for key, value in rule.get("annotations", {}).items():
                yield f"{rule.get('alert')} annotation {key}", value


def dashboard() -> Dict:
    with open(os.path.join(PROM_DIR, "grafana-dashboard.json"), encoding="utf-8") as fh:
        return json.load(fh)


def dashboard_exprs() -> Iterator[Tuple[str, str]]:
    dash = dashboard()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if var["type"] == "query":
            yield f"variable {var['name']}", query
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            yield f"annotation {ann['name']}", ann["expr"]


def test_every_family_follows_the_naming_rules() -> None:
    seen = families()
    assert len(seen) > 30
    for name, mtype, doc in seen:
        if name.startswith("process_"):
            continue  # prometheus_client's standard process collector
        assert name.startswith("spot_agent_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert doc and doc.endswith("."), f"{name}: help text must be a sentence"
        assert not name.endswith("_total"), f"{name}: prometheus_client adds _total to counters"
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds") and mtype == "gauge", name
        for unit in ("milliseconds", "_ms", "minutes", "kilobytes", "megabytes", "_kb", "_mb"):
            assert unit not in name, f"{name}: use base units (seconds, bytes)"
        if mtype == "histogram":
            assert name.endswith("_seconds"), name


def test_label_sets_are_bounded() -> None:
    forbidden = {"id", "event_id", "notice_id", "timestamp", "time", "snapshot_id", "checkpoint_id", "volume_id", "key", "pid"}
    for metric in metrics.REGISTRY.collect():
        for sample in metric.samples:
            assert not forbidden & set(sample.labels), f"{sample.name} has an unbounded label: {sample.labels}"


def test_known_label_values_start_at_zero_so_a_first_increase_is_visible() -> None:
    from agent.events import EVENT_KINDS

    for kind in EVENT_KINDS:
        assert metrics.REGISTRY.get_sample_value("spot_agent_notices_total", {"kind": kind}) is not None
        assert metrics.REGISTRY.get_sample_value("spot_agent_notice_active", {"kind": kind}) is not None
    for result in ("success", "partial", "failed"):
        assert metrics.REGISTRY.get_sample_value("spot_agent_drains_total", {"result": result}) is not None


def test_docs_document_every_metric_with_its_type() -> None:
    section = readme_section()
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([a-z_:]+)`\s*\|\s*(\w+)\s*\|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    missing = []
    for name, mtype, _ in families():
        doc_name = documented_name(name, mtype)
        if doc_name not in rows:
            missing.append(doc_name)
        else:
            assert rows[doc_name] == mtype, f"docs/metrics.md says {doc_name} is a {rows[doc_name]}, it is a {mtype}"
    assert not missing, f"docs/metrics.md metrics reference lacks: {missing}"
    exported = {documented_name(n, t) for n, t, _ in families()}
    stale = sorted(set(rows) - exported)
    assert not stale, f"docs/metrics.md documents metrics the agent does not export: {stale}"


def used_names(exprs: Iterator[Tuple[str, str]]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for where, expr in exprs:
        for name in NAME_RE.findall(expr):
            out.setdefault(name, where)
    return out


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_promql_names_only_exported_metrics(source: str) -> None:
    used = used_names(rule_exprs() if source == "rules" else dashboard_exprs())
    assert len(used) >= (6 if source == "rules" else 20), used
    exported = exported_names()
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"{source} use metrics the agent does not export: {unknown}"


def test_the_name_check_catches_a_typo() -> None:
    used = used_names(iter([("x", 'rate(spot_agent_notice_total[5m]) + spot_agent_build_info')]))
    assert set(used) - exported_names() == {"spot_agent_notice_total"}


def test_the_issue_alerts_exist_with_severity_and_summary() -> None:
    with open(os.path.join(PROM_DIR, "alerts.yml"), encoding="utf-8") as fh:
        rules = [r for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"SpotInterruptionNotice", "DrainFailed", "CheckpointStale", "DatasetSyncFailed", "IMDSUnreachable", "AgentDown"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_has_a_unit_test() -> None:
    with open(os.path.join(PROM_DIR, "alerts.yml"), encoding="utf-8") as fh:
        names = {r["alert"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]}
    with open(os.path.join(PROM_DIR, "alerts_test.yml"), encoding="utf-8") as fh:
        tests = yaml.safe_load(fh)["tests"]
    firing = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert names == firing, f"alerts without a firing test: {names - firing}"
    assert names == quiet, f"alerts without a not-firing test: {names - quiet}"


def test_dashboard_has_the_panels_operators_need() -> None:
    dash = dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows[:5] == ["Notices", "Drain timeline", "Sync progress", "Volume usage", "Checkpoint age"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["description"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = {p["title"] for p in dash["panels"]}
    assert {"Active notices", "Agent state", "Dataset sync progress", "Volume usage", "Checkpoint age"} <= titles
    # Panels must not overlap: Grafana would silently move them.
    cells = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))


def test_docs_list_each_metrics_labels() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    rows = {}
    for line in readme_section().splitlines():
        m = re.match(r"^\|\s*`([a-z_:]+)`\s*\|\s*\w+\s*\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`([a-z_]+)`", m.group(2)))
    checked = 0
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            name = documented_name(obj._name, obj._type)  # noqa: SLF001 - prometheus_client keeps no public accessor
            labels = set(obj._labelnames)  # noqa: SLF001
            if obj._type == "info":  # noqa: SLF001 - an Info's labels are its keys
                labels = {"version", "python"}
            assert rows.get(name) == labels, f"docs/metrics.md labels of {name}: {rows.get(name)}, the metric has {labels}"
            checked += 1
    assert checked > 30
