"""A real torchrun job for the tests: DDP over gloo on 127.0.0.1, a small model, SGD with momentum,
checkpoints with torch.distributed.checkpoint (one file per rank, ``.metadata`` by rank 0 last).

Runs in .venv-torch under torchrun, with spot_agent_job from the agent's env file (PYTHONPATH).
Test knobs: ``--ignore`` (SIGTERM ignored, the notice never looked at: only periodic saves),
``--stall-after-notice`` (the first periodic save after a notice writes its shards and never
commits: rank 0 hangs before ``.metadata``), ``--resume``. Rank 0 writes ``saved.json`` /
``resumed.json`` in ``--out`` with the step and a SHA-256 of every parameter and optimizer buffer.
"""

import argparse
import hashlib
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import spot_agent_job as spot


def digest(model, optim) -> str:
    h = hashlib.sha256()
    msd, osd = get_state_dict(model, optim)
    for name, value in sorted(msd.items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    for pname, st in sorted(osd["state"].items()):
        h.update(str(pname).encode())
        h.update(st["momentum_buffer"].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class StallWriter(FileSystemWriter):
    """Writes the shards, then (rank 0) never writes .metadata: a step cut off mid-save."""

    def finish(self, metadata, results):
        sys.stderr.write("stalling before .metadata\n")
        sys.stderr.flush()
        time.sleep(3600)


def committed_steps(root: str):
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step-") and os.path.exists(os.path.join(root, name, ".metadata")):
            out.append(int(name[5:]))
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100000)
    ap.add_argument("--every", type=int, default=0, help="periodic save every N steps (0: only on a notice)")
    ap.add_argument("--step-seconds", type=float, default=0.02)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ignore", action="store_true")
    ap.add_argument("--stall-after-notice", action="store_true")
    args = ap.parse_args()

    if args.ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        spot.install_signal_handler()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(args.out, f"rank{rank}.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)))
    optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # one step so the momentum buffers exist before a load fills them
    model(torch.zeros(1, 8)).sum().backward()
    optim.step()
    optim.zero_grad()

    start = 0
    if args.resume:
        steps = committed_steps(args.ckpt)
        start = steps[-1]
        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=os.path.join(args.ckpt, f"step-{start:06d}"))
        set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert int(state["step"]) == start
        if rank == 0:
            with open(os.path.join(args.out, "resumed.json"), "w") as fh:
                json.dump({"step": start, "digest": digest(model, optim)}, fh)
        print(f"rank {rank} resumed at step {start}", flush=True)

    def save(step: int, stall: bool = False) -> str:
        path = os.path.join(args.ckpt, f"step-{step:06d}")
        msd, osd = get_state_dict(model, optim)
        writer = (StallWriter if stall else FileSystemWriter)(path)
        dcp.save({"model": msd, "optim": osd, "step": torch.tensor(step)}, storage_writer=writer)
        return path

    noticed_at = None
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step * 10 + rank)
        x = torch.randn(16, 8, generator=g)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        done = step + 1
        if args.ignore:
            if noticed_at is None and spot.notice() is not None:
                noticed_at = done
            if args.every and done % args.every == 0:
                save(done, stall=args.stall_after_notice and noticed_at is not None)
        else:
            if args.every and done % args.every == 0:
                save(done)
            if spot.should_save():
                path = save(done)
                if rank == 0:
                    with open(os.path.join(args.out, "saved.json"), "w") as fh:
                        json.dump({"step": done, "digest": digest(model, optim)}, fh)
                print(f"rank {rank} saved step {done}", flush=True)
                spot.checkpoint_saved(path, step=done)
                break
        time.sleep(args.step_seconds)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
