"""`spot-agent thaw`: thaw every filesystem the agent recorded as frozen in this boot.

The unit's ExecStopPost= runs it, so a filesystem an agent left frozen when it was SIGKILLed (the
watchdog, an OOM kill, TimeoutStopSec) is thawed at once, not only when the agent starts again: its
writers are stuck in D state until then. Local only (the state file and fsfreeze), no network.
"""

from __future__ import annotations

import os
import sys


def register(sub):
    from agent.commands import add_config_arg

    p = sub.add_parser("thaw", help="thaw the filesystems a killed agent left frozen (the unit's ExecStopPost)")
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from agent import config as cfgmod
    from agent.cli import EXIT_FAILED
    from agent.drain.freeze import KEY, SECTION, thaw_leftovers
    from agent.hostfacts import HostFacts
    from agent.runner import Runner
    from agent.state import StateStore

    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        # A config broken since the agent started must not keep a filesystem frozen (nor fail the
        # unit's stop): thaw from the default state directory.
        print(f"spot-agent thaw: {exc.one_line()}; using the default [agent] state_dir", file=sys.stderr)
        cfg = cfgmod.Config()
    path = os.path.join(cfg.agent.state_dir, "state.json")
    if not os.path.exists(path):
        return 0
    state = StateStore(path)
    thawed = thaw_leftovers(state, Runner(), HostFacts.from_config(cfg.host).boot_id())
    for mountpoint in thawed:
        print(f"thawed {mountpoint}, left frozen by an earlier run")
    left = (state.get(SECTION, {}) or {}).get(KEY) or {}
    if left:
        print(f"spot-agent thaw: could not thaw {', '.join(sorted(left))}", file=sys.stderr)
        return EXIT_FAILED
    return 0
