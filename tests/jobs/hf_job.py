"""A real Hugging Face Trainer run on CPU for the tests, checkpointed through spot_agent_job's
TrainerCallback (the Trainer writes ``checkpoint-N/``, ``trainer_state.json`` last).

``--resume``: ``trainer.train(resume_from_checkpoint=True)``. Writes ``saved.json`` or
``resumed.json`` in ``--out`` with the step and a digest of the parameters.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import spot_agent_job as spot


def digest(module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x, y=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, y), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(4096, 8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.x[i].sum().reshape(1)}


class Probe(TrainerCallback):
    def __init__(self, out: str, resuming: bool) -> None:
        self.out, self.resuming = out, resuming

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.resuming:
            with open(os.path.join(self.out, "resumed.json"), "w") as fh:
                json.dump({"step": state.global_step, "digest": digest(model)}, fh)

    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-steps", type=int, default=100000)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Tiny()
    targs = TrainingArguments(output_dir=args.ckpt, max_steps=args.max_steps, per_device_train_batch_size=8,
                              save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no",
                              disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(),
                      callbacks=[spot.hf_callback(), Probe(args.out, args.resume)])
    open(os.path.join(args.out, "started"), "w").close()
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if not args.resume:
        with open(os.path.join(args.out, "saved.json"), "w") as fh:
            json.dump({"step": trainer.state.global_step, "digest": digest(model)}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
