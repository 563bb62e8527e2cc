"""A real PyTorch Lightning fit on CPU for the tests, checkpointed by spot_agent_job's callback.

``--resume``: fit from the newest checkpoint in ``--ckpt``. Writes ``saved.json`` (the step the
callback saved and a digest of the parameters) or ``resumed.json`` (the step and digest right after
the restore) in ``--out``.
"""

import argparse
import hashlib
import json
import os
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

import spot_agent_job as spot


def digest(module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Tiny(LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.out = out
        self.resuming = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def on_train_start(self) -> None:
        if self.resuming:
            with open(os.path.join(self.out, "resumed.json"), "w") as fh:
                json.dump({"step": self.trainer.global_step, "digest": digest(self)}, fh)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        import time

        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-steps", type=int, default=100000)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)
    model = Tiny(args.out)
    callback = spot.lightning_callback(args.ckpt)
    trainer = Trainer(max_steps=args.max_steps, max_epochs=-1, accelerator="cpu", devices=1, callbacks=[callback],
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=args.out)
    ckpt_path = None
    if args.resume:
        ckpt_path = spot.latest_checkpoint(args.ckpt)
        model.resuming = True
    open(os.path.join(args.out, "started"), "w").close()
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    finally:  # after a SIGTERM, Lightning ends the fit with SIGTERMException (a SystemExit)
        if callback.saved:
            with open(os.path.join(args.out, "saved.json"), "w") as fh:
                json.dump({"step": trainer.global_step, "digest": digest(model), "path": callback.saved}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
