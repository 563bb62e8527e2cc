"""Ray: drain this node through Ray's own API, with the preemption reason and the seconds left.

Ray Train and Ray's autoscaler learn of a preemption only when something drains the node with a
deadline (what Ray's docs ask self-managed clusters to do): ``ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N``. The agent never imports Ray (it lives in
the job's environment, not the agent's); it runs the configured ray CLI through the runner.

The drain needs this node's Ray node id. It is looked up before any notice (the hot path runs one
command): a short script run by the Ray install's own Python lists the nodes from the GCS, and the
pure :func:`pick_node` chooses ours by name. Its output is untrusted input like any other.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from agent.runner import Runner

log = logging.getLogger(__name__)

NODE_ID_RE = re.compile(r"^[0-9a-f]{56}$")
PREEMPTION = "DRAIN_NODE_REASON_PREEMPTION"
MAX_NODES = 100000

# Run by the Ray install's Python: prints [{"node_id", "node_name", "ip", "state"}] as JSON.
LIST_NODES = r"""
import json, sys
from ray._raylet import GcsClient
client = GcsClient(address=sys.argv[1])
out = []
for node_id, info in client.get_all_node_info(timeout=float(sys.argv[2])).items():
    nid = node_id.hex() if hasattr(node_id, "hex") else str(node_id)
    state = getattr(info, "state", None)
    try:
        from ray.core.generated import gcs_pb2
        state = gcs_pb2.GcsNodeInfo.GcsNodeState.Name(state)
    except Exception:
        state = str(state)
    out.append({"node_id": nid, "node_name": getattr(info, "node_name", ""),
                "ip": getattr(info, "node_manager_address", ""), "state": state})
print(json.dumps(out))
"""


class RayParseError(ValueError):
    pass


@dataclass
class RayNode:
    node_id: str
    node_name: str
    ip: str
    state: str


def parse_nodes(text: str) -> List[RayNode]:
    """The node list printed by :data:`LIST_NODES`; bad entries are skipped, a bad document raises."""
    try:
        doc = json.loads(text.strip().splitlines()[-1] if text.strip() else "")
    except (ValueError, IndexError) as exc:
        raise RayParseError(f"ray node list: not JSON ({exc})") from None
    if not isinstance(doc, list) or len(doc) > MAX_NODES:
        raise RayParseError("ray node list: not a list of nodes")
    out = []
    for entry in doc:
        if not isinstance(entry, dict):
            continue
        nid, name, ip, state = (entry.get(k) for k in ("node_id", "node_name", "ip", "state"))
        if not isinstance(nid, str) or not NODE_ID_RE.match(nid):
            continue
        out.append(RayNode(nid, name if isinstance(name, str) else "", ip if isinstance(ip, str) else "",
                           state if isinstance(state, str) else ""))
    return out


def pick_node(nodes: List[RayNode], name: str) -> Optional[RayNode]:
    """Our node: the ALIVE node whose name (Ray's default name is the node's IP) or IP is ``name``;
    None when there is none or the match is ambiguous (several alive nodes share an IP: name them)."""
    alive = [n for n in nodes if n.state in ("ALIVE", "1")]
    by_name = [n for n in alive if n.node_name == name]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        return None
    by_ip = [n for n in alive if n.ip == name]
    return by_ip[0] if len(by_ip) == 1 else None


def reason_message(kind: str, action: str, seconds_left: Optional[float]) -> str:
    text = f"spot-agent: {kind}" + (f"/{action}" if action else "")
    if seconds_left is not None:
        text += f", {max(0, int(seconds_left))}s left"
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200]


class Ray:
    def __init__(self, section: Any, runner: Runner, default_name: str = "") -> None:
        self.section = section
        self.runner = runner
        self.name = section.node_name or default_name
        self.node_id = section.node_id or ""

    def _python(self) -> str:
        if self.section.python:
            return self.section.python
        return os.path.join(os.path.dirname(self.section.command[0]), "python")

    def lookup(self) -> Tuple[bool, str]:
        """Find (once) this node's id; prepared before any notice."""
        if self.node_id:
            return True, self.node_id
        if not self.name:
            return False, "no node name to look this node up by (set [ray] node_name or node_id)"
        res = self.runner.run([self._python(), "-c", LIST_NODES, self.section.address, str(self.section.command_timeout)],
                              timeout=self.section.command_timeout + 5, check=False)
        if not res.ok:
            return False, res.error_line()
        try:
            node = pick_node(parse_nodes(res.stdout), self.name)
        except RayParseError as exc:
            return False, str(exc)
        if node is None:
            return False, f"no single alive Ray node named {self.name!r} at {self.section.address}"
        self.node_id = node.node_id
        return True, node.node_id

    def drain(self, message: str, seconds_left: Optional[float]) -> Tuple[bool, str]:
        if not self.node_id:
            ok, why = self.lookup()
            if not ok:
                return False, f"ray: {why}"
        argv = list(self.section.command) + ["drain-node", "--address", self.section.address, "--node-id", self.node_id,
                                             "--reason", PREEMPTION, "--reason-message", message]
        if seconds_left is not None:
            argv += ["--deadline-remaining-seconds", str(max(0, int(seconds_left)))]
        res = self.runner.run(argv, timeout=self.section.command_timeout, check=False)
        if not res.ok:
            return False, f"ray: {res.error_line()}"
        return True, f"ray node {self.node_id[:12]} draining (preemption" + (
            f", {max(0, int(seconds_left))}s left)" if seconds_left is not None else ")")
