"""Planner benchmark: a synthetic listing of N keys against a local tree; peak RSS and time.

Run as a child of transfer_bench.py so that ``ru_maxrss`` is the planner's alone:
  python -m bench.transfer.planner_bench setup DIR N      # tree of N empty files + a manifest vouching for them
  python -m bench.transfer.planner_bench plan DIR N MODE  # MODE fresh (empty tree/manifest) or resync
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from agent.transfer.keys import KeyFilter
from agent.transfer.manifest import LocalManifest
from agent.transfer.planner import Download, RemoteObject, Skip, plan


def key(i: int) -> str:
    return f"ds/shard-{i // 1000:04d}/sample-{i:07d}.jpg"


def listing(n: int):
    # What list_objects_v2 pages yield, key order, one object at a time.
    for i in range(n):
        yield RemoteObject(key(i), 0, '"d41d8cd98f00b204e9800998ecf8427e"')


def setup(root: str, n: int) -> None:
    tree = os.path.join(root, "tree")
    os.makedirs(tree, exist_ok=True)
    m = LocalManifest(os.path.join(root, "resync.sqlite"))
    batch = []
    for i in range(n):
        rel = key(i)[3:]
        full = os.path.join(tree, rel)
        if i % 1000 == 0:
            os.makedirs(os.path.dirname(full), exist_ok=True)
        os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o644))
        batch.append((key(i), rel, 0, '"d41d8cd98f00b204e9800998ecf8427e"', os.lstat(full).st_mtime_ns))
        if len(batch) >= 10000:
            m.db.execute("BEGIN")
            m.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", batch)
            m.db.execute("COMMIT")
            batch.clear()
    m.db.execute("BEGIN")
    m.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", batch)
    m.db.execute("COMMIT")
    m.close()


def run(root: str, n: int, mode: str) -> dict:
    from agent.transfer.datasets import _lstat

    if mode == "fresh":
        tree = os.path.join(root, "empty")
        os.makedirs(tree, exist_ok=True)
        db = os.path.join(root, "fresh.sqlite")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.unlink(db + suffix)
    else:
        tree = os.path.join(root, "tree")
        db = os.path.join(root, "resync.sqlite")
    t0 = time.perf_counter()
    m = LocalManifest(db)
    downloads, skips, buf = 0, 0, []
    # The sync plans against the destination's directory fd (symlink-safe lookups), so does this.
    root_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    for act in plan(listing(n), m.entries(), _lstat(root_fd), "ds/", KeyFilter(), lookup=m.lookup):
        if isinstance(act, Download):
            downloads += 1
            buf.append(act)
            if len(buf) >= 1000:
                m.add_plan(buf)
                buf.clear()
        elif isinstance(act, Skip):
            skips += 1
    m.add_plan(buf)
    m.close()
    os.close(root_fd)
    dt = time.perf_counter() - t0
    return {"mode": mode, "keys": n, "downloads": downloads, "skips": skips, "seconds": round(dt, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(run(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
