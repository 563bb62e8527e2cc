"""spot_agent_job: what training code needs from spot-agent, in one standard-library module.

Import it from the job's own Python (3.9 or later, any venv): the agent's env file puts this
directory on ``PYTHONPATH`` (``EnvironmentFile=-/run/spot-agent/workload.env`` in the unit), or copy
this file next to the training script. It never imports torch, Lightning or transformers unless the
function that needs them is called.

    import spot_agent_job as spot

    spot.install_signal_handler()            # SIGTERM only sets a flag (the default kills)
    for step in range(start, steps):
        train_one_step()
        if spot.should_save():               # every rank gets the same answer at the same step
            save(step)                       # e.g. torch.distributed.checkpoint.save(...)
            spot.checkpoint_saved(path, step=step)
            break

- :func:`notice`: None, or the notice the agent published (kind, action, deadline, seconds_left,
  save_by, the checkpoint it expects).
- :func:`seconds_left`, :func:`wait_for_notice`.
- :func:`checkpoint_saved`: tells the agent which checkpoint to persist and that it is complete.
- :func:`should_save`: the notice, or a caught signal, agreed by all ranks (an all-reduce of the
  flag when a torch process group is initialised), so all ranks save the same step.
- :func:`lightning_callback`, :func:`hf_callback`: the same for PyTorch Lightning and the Hugging
  Face Trainer.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterable, Optional

__all__ = ["notice", "seconds_left", "wait_for_notice", "checkpoint_saved", "install_signal_handler",
           "requested", "should_save", "lightning_callback", "latest_checkpoint", "hf_callback", "NOTICE_FILE",
           "ACK_DIR"]

NOTICE_FILE = os.environ.get("SPOT_AGENT_NOTICE_FILE", "/run/spot-agent/notice.json")
ACK_DIR = os.environ.get("SPOT_AGENT_ACK_DIR", "/run/spot-agent/ack")
FORMAT = 1

_signalled = threading.Event()
_signal_name = ""


def notice(path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The published notice, or None (no notice, or the agent withdrew it)."""
    try:
        with open(path or NOTICE_FILE, "rb") as fh:
            data = json.loads(fh.read(65536).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def seconds_left(path: Optional[str] = None) -> Optional[float]:
    """Seconds until the notice's deadline, now; None without a notice or a deadline."""
    doc = notice(path)
    deadline = doc.get("deadline") if doc else None
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not math.isfinite(deadline):
        return None
    return max(0.0, float(deadline) - time.time())


def wait_for_notice(timeout: Optional[float] = None, poll: float = 0.5,
                    path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Block until a notice is published (or a handled signal arrives); None after ``timeout``."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        doc = notice(path)
        if doc is not None:
            return doc
        if _signalled.is_set():
            return _signal_notice()
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            return None
        _signalled.wait(poll if left is None else min(poll, left))


def _signal_notice() -> Dict[str, Any]:
    return {"format": FORMAT, "kind": "signal", "action": _signal_name, "key": "", "terminal": True,
            "deadline": None, "seconds_left": None, "save_by": None, "checkpoint": {}}


def install_signal_handler(signals: Iterable[int] = (signal.SIGTERM,), chain: bool = False) -> None:
    """Make ``signals`` set the flag :func:`requested` reads instead of killing the process.
    ``chain``: call the handler that was there before too (for example a framework's)."""
    for sig in signals:
        _previous[sig] = signal.getsignal(sig)
        _chain[sig] = chain
        signal.signal(sig, _on_signal)


_previous: Dict[int, Any] = {}
_chain: Dict[int, bool] = {}


def _on_signal(signum: int, frame: Any) -> None:
    global _signal_name
    _signal_name = signal.Signals(signum).name
    _signalled.set()
    prev = _previous.get(signum)
    if _chain.get(signum) and callable(prev):
        prev(signum, frame)


def requested(path: Optional[str] = None, terminal_only: bool = True) -> bool:
    """This process has seen a notice (the file, or a handled signal); no collective, per rank."""
    if _signalled.is_set():
        return True
    doc = notice(path)
    return doc is not None and (doc.get("terminal", True) or not terminal_only)


def should_save(path: Optional[str] = None, group: Any = None) -> bool:
    """:func:`requested`, agreed by every rank: with an initialised torch process group, an
    all-reduce (MAX) of the flag, so if one rank saw the notice all of them save this step. Call it
    at the same point of every step on every rank."""
    flag = requested(path)
    dist = _torch_dist()
    if dist is None:
        return flag
    import torch

    backend = dist.get_backend(group)
    device = "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _torch_dist() -> Any:
    torch = sys.modules.get("torch")  # never import torch for a job that does not use it
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def _rank() -> int:
    dist = _torch_dist()
    if dist is not None:
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def checkpoint_saved(path: str, step: Optional[int] = None, all_ranks: bool = False,
                     ack_dir: Optional[str] = None) -> bool:
    """Tell the agent that the checkpoint at ``path`` is complete and is the one to persist.

    Only rank 0 writes (unless ``all_ranks``): call it on every rank after the save returned (for
    torch.distributed.checkpoint, rank 0 has then written ``.metadata``). Returns whether the
    acknowledgement was written; never raises for a missing agent."""
    if not all_ranks and _rank() != 0:
        return False
    doc = notice() or {}
    body = {"format": FORMAT, "path": os.path.abspath(path), "notice": str(doc.get("key", "") or ""),
            "time": time.time(), "pid": os.getpid()}
    if step is not None:
        body["step"] = int(step)
    directory = ack_dir or ACK_DIR
    uid = os.getuid()
    data = json.dumps(body).encode()
    tmp = os.path.join(directory, ".ack-%d-%d.tmp" % (uid, os.getpid()))
    for name in ("ack-%d.json" % uid, "ack-%d-%d.json" % (uid, os.getpid())):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(directory, name))
            return True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return False


# -- framework adapters: each class is built on first use, importing the framework only then ----------
def lightning_callback(dirpath: str, filename: str = "spot-step={step}.ckpt", stop: bool = True) -> Any:
    """A Lightning ``Callback``: on a notice (or Lightning's own SIGTERM flag), agreed by all ranks at
    a batch end, ``trainer.save_checkpoint`` into ``dirpath``, acknowledge, and stop the fit.
    Resume with ``trainer.fit(model, ckpt_path=latest_checkpoint(dirpath))``."""
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the older package name
        from pytorch_lightning import Callback  # type: ignore[no-redef]

    class SpotAgentCallback(Callback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.dirpath, self.filename, self.stop = dirpath, filename, stop
            self.saved: Optional[str] = None

        def _save(self, trainer: Any) -> None:
            path = os.path.join(self.dirpath, self.filename.format(step=trainer.global_step))
            trainer.save_checkpoint(path)
            self.saved = path
            if trainer.is_global_zero:
                checkpoint_saved(path, step=trainer.global_step, all_ranks=True)
            if self.stop:
                trainer.should_stop = True

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.saved:
                return
            flag = requested() or bool(getattr(trainer, "received_sigterm", False))
            if trainer.world_size > 1:
                flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
            if flag:
                self._save(trainer)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            # Lightning raises SIGTERMException at the next batch start when the signal came after
            # this batch's end: save there, once, if the notice is real.
            if not self.saved and (requested() or getattr(trainer, "received_sigterm", False)):
                try:
                    self._save(trainer)
                except Exception:  # noqa: BLE001 - the original exception matters more
                    pass

    return SpotAgentCallback()


def latest_checkpoint(dirpath: str, suffix: str = ".ckpt") -> Optional[str]:
    """The newest file ending in ``suffix`` in ``dirpath`` (by mtime), or None: the resume path."""
    try:
        names = [n for n in os.listdir(dirpath) if n.endswith(suffix)]
    except OSError:
        return None
    if not names:
        return None
    return max((os.path.join(dirpath, n) for n in names), key=lambda p: os.stat(p).st_mtime)


def hf_callback(handle_sigterm: bool = True) -> Any:
    """A Hugging Face ``TrainerCallback``: on a notice agreed by all ranks at a step end, the Trainer
    saves ``checkpoint-N`` and stops; the save is acknowledged. Resume with
    ``trainer.train(resume_from_checkpoint=True)``. ``handle_sigterm``: SIGTERM sets the flag
    instead of killing the process (``enable_jit_checkpoint`` replaces this handler with its own)."""
    from transformers import TrainerCallback

    if handle_sigterm and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        install_signal_handler()

    class SpotAgentTrainerCallback(TrainerCallback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.requested = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if not self.requested and should_save():
                self.requested = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.requested and state.is_world_process_zero:
                path = os.path.join(args.output_dir, "checkpoint-%d" % state.global_step)
                checkpoint_saved(path, step=state.global_step, all_ranks=True)
            return control

    return SpotAgentTrainerCallback()
