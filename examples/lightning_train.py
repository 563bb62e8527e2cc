#!/usr/bin/env python3
"""A PyTorch Lightning fit that spot-agent's lightning profile protects: one callback line.

On a notice (notice.json, or Lightning's own SIGTERM flag) the callback saves spot-step=N.ckpt in
--ckpt at a batch end, agreed by all ranks, tells the agent, and stops the fit. At start it resumes
from the newest checkpoint there.

    python lightning_train.py --ckpt /mnt/checkpoints/lightning
"""

import argparse

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

import spot_agent_job as spot  # on PYTHONPATH from /run/spot-agent/workload.env


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    args = ap.parse_args()
    x = torch.randn(10_000, 32)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=64)
    trainer = Trainer(max_epochs=100, callbacks=[spot.lightning_callback(args.ckpt)])
    trainer.fit(Model(), data, ckpt_path=spot.latest_checkpoint(args.ckpt))


if __name__ == "__main__":
    main()
