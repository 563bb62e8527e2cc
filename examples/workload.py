#!/usr/bin/env python3
"""A stand-in training job for examples/workload.service and the boot test.

It "trains" (counts steps), and writes a checkpoint when asked: on SIGUSR1 it saves and keeps going,
on SIGTERM it saves and exits 0. A checkpoint is written to a temporary file and renamed, and a
marker file (``checkpoint.done``) appears only after the data is on disk, which is what spot-agent's
``[drain.workload] marker`` waits for. Every signal is appended to ``events.log`` with a timestamp,
so the order of drain and stop can be checked afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def log(directory: str, what: str) -> None:
    with open(os.path.join(directory, "events.log"), "a") as fh:
        fh.write(f"{time.time():.6f} {what}\n")
        fh.flush()
        os.fsync(fh.fileno())


def save(directory: str, step: int) -> None:
    tmp = os.path.join(directory, "checkpoint.json.tmp")
    with open(tmp, "w") as fh:
        json.dump({"step": step, "time": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(directory, "checkpoint.json"))
    with open(os.path.join(directory, "checkpoint.done"), "w") as fh:
        fh.write(f"{step}\n")
    log(directory, f"checkpoint step={step}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/lib/workload", help="checkpoint and log directory")
    ap.add_argument("--step-seconds", type=float, default=0.1, help="time per training step")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)

    requested = {"checkpoint": False, "stop": False}

    def on_usr1(signum, frame):
        requested["checkpoint"] = True

    def on_term(signum, frame):
        requested["stop"] = True

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)

    step = 0
    try:
        with open(os.path.join(args.dir, "checkpoint.json")) as fh:
            step = int(json.load(fh)["step"])
    except (OSError, ValueError, KeyError):
        pass
    log(args.dir, f"started pid={os.getpid()} step={step}")
    while True:
        if requested["checkpoint"]:
            requested["checkpoint"] = False
            log(args.dir, "SIGUSR1")
            save(args.dir, step)
        if requested["stop"]:
            log(args.dir, "SIGTERM")
            save(args.dir, step)
            log(args.dir, "exit")
            return 0
        time.sleep(args.step_seconds)
        step += 1


if __name__ == "__main__":
    sys.exit(main())
