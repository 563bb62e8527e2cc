#!/usr/bin/env python3
"""A torchrun job that spot-agent's torchrun profile protects without anything else to configure.

Each rank trains; when a notice arrives (the agent's notice.json, or the SIGTERM torchrun forwards)
all ranks agree at the same step, save it with torch.distributed.checkpoint into step-N/ (rank 0
writes .metadata last: the commit the agent waits for), tell the agent, and exit. At start it
resumes from the newest committed step (after a replacement instance restored it).

    torchrun --standalone --nproc-per-node 2 torchrun_train.py --ckpt /mnt/checkpoints/run-1
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import spot_agent_job as spot  # on PYTHONPATH from /run/spot-agent/workload.env


def newest_step(root):
    steps = [int(n[5:]) for n in os.listdir(root) if n.startswith("step-")
             and os.path.exists(os.path.join(root, n, ".metadata"))] if os.path.isdir(root) else []
    return max(steps, default=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=1000, help="periodic checkpoint every N steps")
    args = ap.parse_args()

    spot.install_signal_handler()  # SIGTERM (forwarded by torchrun) sets a flag instead of killing
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    model = DDP(torch.nn.Linear(128, 128))
    optim = torch.optim.AdamW(model.parameters())

    def state(step):
        msd, osd = get_state_dict(model, optim)
        return {"model": msd, "optim": osd, "step": torch.tensor(step)}

    start = 0
    last = newest_step(args.ckpt)
    if last is not None:
        st = state(0)
        dcp.load(st, checkpoint_id=os.path.join(args.ckpt, f"step-{last:08d}"))
        set_state_dict(model, optim, model_state_dict=st["model"], optim_state_dict=st["optim"])
        start = int(st["step"])

    for step in range(start, args.steps):
        loss = model(torch.randn(32, 128)).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        done = step + 1
        stop = spot.should_save()  # every rank, every step: an all-reduce of the flag
        if stop or done % args.every == 0:
            path = os.path.join(args.ckpt, f"step-{done:08d}")
            dcp.save(state(done), checkpoint_id=path)
            if stop:
                spot.checkpoint_saved(path, step=done)  # rank 0 tells the agent
                break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
