"""Ray's node list as untrusted input, and the drain-node command the agent runs (recording runner;
the real cluster is in tests/engines/test_ray_engine.py)."""

from __future__ import annotations

import json

import pytest

from agent.config import RaySection, parse
from agent.runner import Result
from agent.schedulers.ray import PREEMPTION, Ray, RayParseError, parse_nodes, pick_node, reason_message

A = "a" * 56
B = "b" * 56


def nodes_text(*entries) -> str:
    return "some warning line\n" + json.dumps(list(entries))


def test_parse_nodes_keeps_only_well_formed_entries():
    text = nodes_text({"node_id": A, "node_name": "worker", "ip": "10.0.0.2", "state": "ALIVE"},
                      {"node_id": "zz", "node_name": "x"}, "junk", {"node_id": B, "node_name": 5, "ip": None, "state": "DEAD"})
    got = parse_nodes(text)
    assert [(n.node_id, n.node_name, n.state) for n in got] == [(A, "worker", "ALIVE"), (B, "", "DEAD")]


@pytest.mark.parametrize("text", ["", "nope", '{"a": 1}'])
def test_parse_nodes_refuses_a_document_that_is_not_a_list(text):
    with pytest.raises(RayParseError):
        parse_nodes(text)


def test_pick_node_by_name_then_ip_and_never_guesses():
    from agent.schedulers.ray import RayNode

    n = [RayNode(A, "head", "10.0.0.1", "ALIVE"), RayNode(B, "10.0.0.2", "10.0.0.2", "ALIVE"),
         RayNode("c" * 56, "old", "10.0.0.2", "DEAD")]
    assert pick_node(n, "head").node_id == A
    assert pick_node(n, "10.0.0.2").node_id == B
    assert pick_node(n, "nobody") is None
    twins = [RayNode(A, "w", "127.0.0.1", "ALIVE"), RayNode(B, "w", "127.0.0.1", "ALIVE")]
    assert pick_node(twins, "w") is None and pick_node(twins, "127.0.0.1") is None


class Recorder:
    def __init__(self, stdout="", rc=0):
        self.calls = []
        self.stdout = stdout
        self.rc = rc

    def run(self, argv, timeout=60.0, check=True, input=None):
        self.calls.append(list(argv))
        return Result(list(argv), self.rc, self.stdout, "boom" if self.rc else "", 0.0)


def test_drain_runs_ray_drain_node_with_preemption_and_seconds_left():
    sec = RaySection(enabled=True, command=["/opt/ray/bin/ray"], address="10.0.0.1:6379", node_name="worker")
    rec = Recorder(nodes_text({"node_id": A, "node_name": "worker", "ip": "10.0.0.2", "state": "ALIVE"}))
    ray = Ray(sec, rec)
    assert ray.lookup() == (True, A)
    assert rec.calls[0][0] == "/opt/ray/bin/python" and rec.calls[0][-2] == "10.0.0.1:6379"
    ok, msg = ray.drain(reason_message("spot-interruption", "terminate", 97.6), 97.6)
    assert ok, msg
    assert rec.calls[-1] == ["/opt/ray/bin/ray", "drain-node", "--address", "10.0.0.1:6379", "--node-id", A,
                             "--reason", PREEMPTION, "--reason-message", "spot-agent: spot-interruption/terminate, 97s left",
                             "--deadline-remaining-seconds", "97"]


def test_a_failed_drain_is_one_line():
    sec = RaySection(enabled=True, address="10.0.0.1:6379", node_id=A)
    ok, msg = Ray(sec, Recorder(rc=1)).drain("m", None)
    assert not ok and msg == f"ray: ray drain-node --address 10.0.0.1:6379 --node-id {A} --reason {PREEMPTION} --reason-message m exited 1: boom"


def test_config_needs_an_address_and_a_way_to_find_the_node():
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse("[ray]\nenabled = true\n")
    assert "ray.address: required" in str(exc.value) and "ray.node_name" in str(exc.value)
    with pytest.raises(ConfigError):
        parse('[ray]\nnode_id = "xyz"\n')
