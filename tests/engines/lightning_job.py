"""A real PyTorch Lightning fit under Slurm, with Lightning's own Slurm auto-requeue (SIGUSR1 ->
hpc_ckpt_N.ckpt + scontrol requeue). One addition, the way a job tells spot-agent a save is committed:
a CheckpointIO that writes the commit file ([slurm] commit_file) once the checkpoint file is written.

Usage (from an sbatch script, under srun): python lightning_job.py ROOT
"""

import os
import sys

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

ROOT = sys.argv[1]


class CommitIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        super().save_checkpoint(checkpoint, path, storage_options)
        commit = os.path.join(ROOT, "commit", os.environ["SLURM_JOB_ID"], os.environ["SLURMD_NODENAME"] + ".done")
        os.makedirs(os.path.dirname(commit), exist_ok=True)
        with open(commit, "w") as fh:
            fh.write(f"{path}\n")


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_start(self):
        with open(os.path.join(ROOT, f"start-{os.environ['SLURM_RESTART_COUNT'] if 'SLURM_RESTART_COUNT' in os.environ else 0}"), "w") as fh:
            fh.write(f"{self.trainer.global_step}\n")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 5:
            open(os.path.join(ROOT, "training"), "w").close()


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000_000

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(4, generator=g), torch.randn(1, generator=g)


if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = Trainer(default_root_dir=os.path.join(ROOT, "lightning"), accelerator="cpu", devices=1, max_steps=1_000_000,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      plugins=[CommitIO()])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(Data(), batch_size=8, num_workers=0))
