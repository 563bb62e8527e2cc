"""A toy training process: the workload the drain tests and the demo tell to checkpoint.

It "trains" one step every ``--step-seconds``, writes a checkpoint file every ``--every`` steps into
``--dir`` (``ckpt-00000042.json`` plus ``--size`` bytes of payload in ``ckpt-00000042.bin``), and on
SIGTERM writes a final checkpoint with the current step, optionally touches ``--marker``, and exits 0.
On start it resumes from the newest checkpoint's step. ``--ignore-sigterm`` makes it the misbehaving
workload: it logs the signal and keeps going.

Checkpoints are written atomically (temp file, fsync, rename) so a reader never sees half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from typing import Optional

_NAME = re.compile(r"^ckpt-(\d{8})\.json$")
_CHUNK = 4 * 1024 * 1024


def newest_step(directory: str) -> int:
    best = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        m = _NAME.match(name)
        if m:
            best = max(best, int(m.group(1)))
    return best


def _atomic(path: str, writer) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        writer(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: str, step: int, size: int, final: bool) -> str:
    os.makedirs(directory, exist_ok=True)
    if size > 0:
        block = (b"%016d" % step) * (_CHUNK // 16)

        def payload(fh) -> None:
            left = size
            while left > 0:
                n = min(left, len(block))
                fh.write(block[:n])
                left -= n

        _atomic(os.path.join(directory, f"ckpt-{step:08d}.bin"), payload)
    meta = json.dumps({"step": step, "final": final, "time": time.time(), "size": size}).encode()
    path = os.path.join(directory, f"ckpt-{step:08d}.json")
    _atomic(path, lambda fh: fh.write(meta))
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description="toy training process for spot-agent tests and demo")
    p.add_argument("--dir", required=True, help="checkpoint directory")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--step-seconds", type=float, default=0.1)
    p.add_argument("--size", type=int, default=0, help="payload bytes per checkpoint")
    p.add_argument("--final-size", type=int, default=-1, help="payload bytes of the final checkpoint (default --size)")
    p.add_argument("--marker", default="", help="file touched once the final checkpoint is written")
    p.add_argument("--pidfile", default="")
    p.add_argument("--ignore-sigterm", action="store_true", help="misbehave: keep running on SIGTERM")
    p.add_argument("--max-steps", type=int, default=0, help="exit after this many steps (0: never)")
    args = p.parse_args(argv)

    stop = {"flag": False}

    def on_term(signum, frame) -> None:
        if args.ignore_sigterm:
            print(f"toy: got signal {signum}, ignoring it", flush=True)
            return
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    if args.pidfile:
        with open(args.pidfile, "w") as fh:
            fh.write(f"{os.getpid()}\n")
    step = newest_step(args.dir)
    print(f"toy: starting at step {step}", flush=True)
    while not stop["flag"]:
        time.sleep(args.step_seconds)
        if stop["flag"]:
            break
        step += 1
        if step % args.every == 0:
            write_checkpoint(args.dir, step, args.size, final=False)
        if args.max_steps and step >= args.max_steps:
            break
    final_size = args.size if args.final_size < 0 else args.final_size
    path = write_checkpoint(args.dir, step, final_size, final=True)
    if args.marker:
        with open(args.marker, "w") as fh:
            fh.write(f"{step}\n")
            fh.flush()
            os.fsync(fh.fileno())
    print(f"toy: final checkpoint at step {step}: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
