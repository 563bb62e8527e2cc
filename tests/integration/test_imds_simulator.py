"""The simulator's IMDSv2 token and format rules, over real HTTP."""

import json

import requests

TOKEN = "/latest/api/token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def token(sim, ttl="60"):
    r = requests.put(sim.url + TOKEN, headers={TTL: ttl}, timeout=2)
    assert r.status_code == 200
    assert r.headers[TTL] == ttl
    return r.text


def get(sim, path, tok=None):
    headers = {"X-aws-ec2-metadata-token": tok} if tok else {}
    return requests.get(sim.url + path, headers=headers, timeout=2)


def test_ttl_bounds(imds_sim):
    for bad in ("0", "21601", "-5", "abc"):
        assert requests.put(imds_sim.url + TOKEN, headers={TTL: bad}, timeout=2).status_code == 400
    assert requests.put(imds_sim.url + TOKEN, timeout=2).status_code == 400
    token(imds_sim, "1")
    token(imds_sim, "21600")


def test_forwarded_put_is_rejected(imds_sim):
    r = requests.put(imds_sim.url + TOKEN, headers={TTL: "60", "X-Forwarded-For": "10.0.0.1"}, timeout=2)
    assert r.status_code == 403


def test_v2_required_and_bad_token(imds_sim):
    assert get(imds_sim, "/latest/meta-data/instance-id").status_code == 401
    assert get(imds_sim, "/latest/meta-data/instance-id", "not-a-token").status_code == 401
    tok = token(imds_sim)
    r = get(imds_sim, "/latest/meta-data/instance-id", tok)
    assert r.status_code == 200 and r.text == "i-0123456789abcdef0"


def test_expiry_fault_invalidates_tokens(imds_sim):
    tok = token(imds_sim)
    imds_sim.control("fault", {"kind": "token-expiry"})
    assert get(imds_sim, "/latest/meta-data/instance-id", tok).status_code == 401


def test_token_expires_by_ttl(imds_sim):
    import time

    tok = token(imds_sim, "1")
    time.sleep(1.2)
    assert get(imds_sim, "/latest/meta-data/instance-id", tok).status_code == 401


def test_notice_formats(imds_sim):
    tok = token(imds_sim)
    assert get(imds_sim, "/latest/meta-data/spot/instance-action", tok).status_code == 404
    imds_sim.control("spot", {"action": "stop", "in": 120})
    body = json.loads(get(imds_sim, "/latest/meta-data/spot/instance-action", tok).text)
    assert body["action"] == "stop" and body["time"].endswith("Z")
    imds_sim.control("scheduled", {"code": "instance-retirement", "in": 600, "duration": 3600})
    events = json.loads(get(imds_sim, "/latest/meta-data/events/maintenance/scheduled", tok).text)
    assert events[0]["Code"] == "instance-retirement" and events[0]["NotBefore"].endswith(" GMT")
    assert "NotAfter" in events[0]
    imds_sim.control("asg", {"state": "Terminated"})
    assert get(imds_sim, "/latest/meta-data/autoscaling/target-lifecycle-state", tok).text == "Terminated"


def test_identity_paths(imds_sim):
    tok = token(imds_sim)
    doc = json.loads(get(imds_sim, "/latest/dynamic/instance-identity/document", tok).text)
    assert doc["instanceId"] == "i-0123456789abcdef0" and doc["region"] == "us-east-1"
    assert get(imds_sim, "/latest/meta-data/placement/availability-zone", tok).text == "us-east-1a"
    assert get(imds_sim, "/latest/meta-data/instance-life-cycle", tok).text == "spot"
    assert "ami" in get(imds_sim, "/latest/meta-data/block-device-mapping/", tok).text


def test_faults(imds_sim):
    tok = token(imds_sim)
    imds_sim.control("fault", {"kind": "429", "count": 2})
    assert [get(imds_sim, "/latest/meta-data/instance-id", tok).status_code for _ in range(3)] == [429, 429, 200]
    imds_sim.control("fault", {"kind": "5xx", "count": 1, "code": 503})
    assert get(imds_sim, "/latest/meta-data/instance-id", tok).status_code == 503
    imds_sim.control("fault", {"kind": "403"})
    assert get(imds_sim, "/latest/meta-data/instance-id", tok).status_code == 403
    assert requests.put(imds_sim.url + TOKEN, headers={TTL: "60"}, timeout=2).status_code == 403
    imds_sim.control("fault", {"kind": "403", "on": False})
    imds_sim.control("fault", {"kind": "malformed", "path": "spot/instance-action", "body": "<html>x</html>", "count": 1})
    assert get(imds_sim, "/latest/meta-data/spot/instance-action", tok).text == "<html>x</html>"
    assert get(imds_sim, "/latest/meta-data/spot/instance-action", tok).status_code == 404


def test_trigger_cli_round_trip(imds_sim):
    from agent.cli import main

    assert main(["simulate", "trigger", "spot", "--action", "hibernate", "--in", "0", "--endpoint", imds_sim.url]) == 0
    assert imds_sim.state.spot["action"] == "hibernate"
    assert main(["simulate", "trigger", "spot", "--time", "2030-01-02T03:04:05Z", "--endpoint", imds_sim.url]) == 0
    assert imds_sim.state.spot["time"] == 1893553445.0
    assert main(["simulate", "trigger", "clear", "--what", "spot", "--endpoint", imds_sim.url]) == 0
    assert imds_sim.state.spot is None
    assert main(["simulate", "trigger", "fault", "--endpoint", imds_sim.url]) == 2
    assert main(["simulate", "trigger", "spot", "--endpoint", "http://127.0.0.1:9"]) == 1
