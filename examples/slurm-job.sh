#!/bin/bash
# A multi-node Slurm job that spot-agent can save: it requeues, catches SIGUSR1 on every node, saves
# the same step on each, and writes one commit file per node ([slurm] commit_file in
# examples/slurm-node.toml). Submit with: sbatch examples/slurm-job.sh
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --job-name=train

# scancel --full signals the batch shell too: it only waits for the steps.
trap 'echo "batch shell: USR1 (the steps save)"' USR1

srun bash -c '
  ckpt=/scratch/checkpoints                      # the node-local dir spot-agent uploads
  commit=/shared/checkpoints/$SLURM_JOB_ID/$SLURMD_NODENAME.done
  mkdir -p "$ckpt" "$(dirname "$commit")"
  step=$(cat "$ckpt/latest" 2>/dev/null || echo 0)   # resume after a requeue
  save() {
    mkdir -p "$ckpt/step-$step"
    echo "weights of step $step" > "$ckpt/step-$step/model.bin"   # your framework saves here
    touch "$ckpt/step-$step/DONE"                                 # the marker: this step is complete
    echo "$step" > "$ckpt/latest"
    touch "$commit"                                               # tells spot-agent this node is done

  }
  trap save USR1
  while true; do step=$((step + 1)); sleep 1 & wait $!; done
' &
wait $!   # returns when the trap fires in this shell
wait $!   # then wait for the steps themselves
