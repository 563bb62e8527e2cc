"""A local EC2 host for the demo and the tests: moto's EBS volumes, given real block devices.

moto models EBS volumes and snapshots as records without data. Installed into the process that runs
moto (agent.sim.localaws.LocalAWS, in-process or as ``python -m agent.sim.blockdevs``), this gives
each volume a sparse backing file and each attachment a real loop device, with the device tree a
Nitro instance shows: ``<dev_root>/disk/by-id/nvme-Amazon_Elastic_Block_Store_volXXXX`` -> the loop
node and ``<sys_root>/block/loopN/device/{serial,model}`` (space padded, like NVMe). So an agent
process talking to moto over HTTP finds, formats and mounts real devices.

- CreateVolume: a sparse file of min(size * bytes_per_gib, size_cap) bytes (default 512 MiB: mkfs.xfs
  wants more than 300 MB), or a sparse copy of the snapshot's file. ClientToken is honoured like AWS
  does (moto ignores it): the same token returns the same volume.
- AttachVolume: ``losetup`` the file, build the by-id symlink, the sysfs entries and
  ``<dev_root>/loopN`` (a symlink to /dev/loopN). Under the strict local AWS (:func:`attach_delay`)
  all of that happens only when the attachment reaches ``attached``, as on EC2: the device is not
  there while the volume is ``attaching``.
- CreateSnapshot / CopySnapshot: a synchronous sparse copy (``cp --reflink=auto --sparse=always``)
  inside the API call: the snapshot is the data at the moment the call returns. ``snapshot_delay``
  makes the call slow, and the copy is taken at the end of the delay, so a filesystem thawed while the
  call is in flight shows up in the snapshot.
- ModifyVolume to a bigger size: the file grows and ``losetup -c`` tells the kernel.
- DetachVolume / DeleteVolume / DeleteSnapshot: detach the loop device / remove the files.

Root is needed (losetup). ``cleanup()`` detaches every loop device made here and removes the trees.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from agent.runner import Runner

MiB = 1024 * 1024
GiB = 1024 * MiB
EBS_MODEL = "Amazon Elastic Block Store"
INSTANCE_STORE_MODEL = "Amazon EC2 NVMe Instance Storage"

_ACTIVE: Optional["LocalBlockDevices"] = None
_ORIGINALS: Dict[str, Any] = {}
_TOKEN = threading.local()
_REQUEST = threading.local()  # what the strict local AWS says about the call this thread is serving


@contextlib.contextmanager
def attach_delay(seconds: float) -> Iterator[None]:
    """Within this block (one AttachVolume served by the strict local AWS, on this thread), the device
    appears ``seconds`` after the call, when the attachment reaches ``attached``."""
    _REQUEST.attach_delay = seconds
    try:
        yield
    finally:
        _REQUEST.attach_delay = 0.0


def written_gib(volume_id: str) -> Optional[float]:
    """GiB of data written on ``volume_id``'s backing file (its allocated blocks), or None when the
    active host does not know the volume: what a snapshot's duration grows with."""
    sim = _ACTIVE
    if sim is None:
        return None
    try:
        st = os.stat(sim.volume_file(volume_id))
    except OSError:
        return None
    return st.st_blocks * 512 / sim.bytes_per_gib


class LocalBlockDevices:
    def __init__(self, root_dir: str, dev_root: str, sys_root: str, size_cap: int = 512 * MiB,
                 bytes_per_gib: int = GiB, instance_ids: Optional[Set[str]] = None,
                 runner: Optional[Runner] = None) -> None:
        self.root_dir = root_dir
        self.dev_root = dev_root
        self.sys_root = sys_root
        self.size_cap = size_cap
        self.bytes_per_gib = bytes_per_gib
        self.instance_ids = instance_ids  # None: every instance gets devices
        self.runner = runner or Runner()
        self.snapshot_delay = 0.0
        self.on_snapshot: List[Callable[[str, str], None]] = []  # (snapshot_id, volume_id), before the copy
        self.snapshot_log: List[Dict[str, Any]] = []
        self.loops: Dict[str, str] = {}  # volume id -> /dev/loopN
        self.extra_loops: List[str] = []  # instance-store disks
        self.tokens: Dict[str, str] = {}  # ClientToken -> volume id
        self.pending_attach: Dict[str, threading.Timer] = {}  # volume id -> the timer that publishes it
        self._closed = False
        self._lock = threading.RLock()
        for d in (root_dir, os.path.join(dev_root, "disk", "by-id"), os.path.join(sys_root, "block")):
            os.makedirs(d, exist_ok=True)

    # ---- files ----------------------------------------------------------------------------------

    def volume_file(self, volume_id: str) -> str:
        return os.path.join(self.root_dir, f"{volume_id}.img")

    def snapshot_file(self, snapshot_id: str) -> str:
        return os.path.join(self.root_dir, f"{snapshot_id}.img")

    def size_bytes(self, size_gib: int) -> int:
        return min(int(size_gib) * self.bytes_per_gib, self.size_cap)

    def _ensure_file(self, volume_id: str, size_gib: int) -> str:
        path = self.volume_file(volume_id)
        want = self.size_bytes(size_gib)
        if not os.path.exists(path):
            with open(path, "wb") as fh:
                fh.truncate(want)
        elif os.path.getsize(path) < want:
            with open(path, "r+b") as fh:
                fh.truncate(want)
        return path

    def _copy(self, src: str, dst: str) -> None:
        self.runner.run(["cp", "--reflink=auto", "--sparse=always", src, dst], timeout=600)

    # ---- devices --------------------------------------------------------------------------------

    def _publish(self, loop: str, serial: str, model: str, by_id: str = "") -> None:
        name = os.path.basename(loop)
        dev_dir = os.path.join(self.sys_root, "block", name, "device")
        os.makedirs(dev_dir, exist_ok=True)
        with open(os.path.join(dev_dir, "serial"), "w") as fh:
            fh.write(serial.ljust(20) + "\n")
        with open(os.path.join(dev_dir, "model"), "w") as fh:
            fh.write(model.ljust(40) + "\n")
        node = os.path.join(self.dev_root, name)
        if os.path.lexists(node):
            os.unlink(node)
        os.symlink(loop, node)
        if by_id:
            link = os.path.join(self.dev_root, "disk", "by-id", by_id)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(loop, link)

    def _unpublish(self, loop: str, by_id: str = "") -> None:
        name = os.path.basename(loop)
        shutil.rmtree(os.path.join(self.sys_root, "block", name), ignore_errors=True)
        for path in [os.path.join(self.dev_root, name)] + ([os.path.join(self.dev_root, "disk", "by-id", by_id)] if by_id else []):
            if os.path.lexists(path):
                os.unlink(path)

    def _losetup(self, path: str) -> str:
        loop = self.runner.run(["losetup", "--find", "--show", path], timeout=60).stdout.strip()
        # The kernel keeps a node's read-only flag (blockdev --setro) across loop reuse: start clean.
        self.runner.run(["blockdev", "--setrw", loop], timeout=30, check=False)
        return loop

    def _detach_loop(self, loop: str) -> None:
        self.runner.run(["blockdev", "--setrw", loop], timeout=30, check=False)
        self.runner.run(["losetup", "-d", loop], timeout=60, check=False)

    @staticmethod
    def by_id_name(volume_id: str) -> str:
        return "nvme-Amazon_Elastic_Block_Store_" + volume_id.replace("-", "", 1)

    def loop_device(self, volume_id: str) -> Optional[str]:
        with self._lock:
            return self.loops.get(volume_id)

    def add_instance_store(self, count: int = 1, size: int = 512 * MiB) -> List[str]:
        """Loop devices that look like NVMe instance-store disks (model, serial, node under dev_root)."""
        out = []
        with self._lock:
            for i in range(count):
                path = os.path.join(self.root_dir, f"instance-store-{len(self.extra_loops)}.img")
                with open(path, "wb") as fh:
                    fh.truncate(size)
                loop = self._losetup(path)
                self.extra_loops.append(loop)
                self._publish(loop, f"AWS{len(self.extra_loops):017d}", INSTANCE_STORE_MODEL)
                out.append(loop)
        return out

    # ---- moto hooks -----------------------------------------------------------------------------

    def after_create_volume(self, volume: Any) -> Any:
        with self._lock:
            token = getattr(_TOKEN, "value", None)
            if token:
                self.tokens[token] = volume.id
            if volume.snapshot_id and os.path.exists(self.snapshot_file(volume.snapshot_id)):
                self._copy(self.snapshot_file(volume.snapshot_id), self.volume_file(volume.id))
            self._ensure_file(volume.id, volume.size)
        return volume

    def existing_for_token(self, backend: Any) -> Optional[Any]:
        token = getattr(_TOKEN, "value", None)
        if not token:
            return None
        with self._lock:
            vid = self.tokens.get(token)
        return backend.volumes.get(vid) if vid else None

    def after_attach(self, volume: Any, instance_id: str, device_path: str = "", root_device: str = "") -> None:
        if self.instance_ids is not None and instance_id not in self.instance_ids:
            return
        if device_path and device_path == root_device:
            return  # the instance's root volume: the host's own disk, not ours to model
        delay = float(getattr(_REQUEST, "attach_delay", 0.0) or 0.0)
        if delay > 0:
            timer = threading.Timer(delay, self._attached, (volume.id, volume.size))
            timer.daemon = True
            with self._lock:
                old = self.pending_attach.pop(volume.id, None)
                if old is not None:
                    old.cancel()
                self.pending_attach[volume.id] = timer
            timer.start()
            return
        self._attached(volume.id, volume.size)

    def _attached(self, volume_id: str, size_gib: int) -> None:
        """The attachment reached ``attached``: the device appears."""
        with self._lock:
            self.pending_attach.pop(volume_id, None)
            if volume_id in self.loops or self._closed:
                return
            path = self._ensure_file(volume_id, size_gib)
            loop = self._losetup(path)
            self.loops[volume_id] = loop
            self._publish(loop, volume_id.replace("-", "", 1), EBS_MODEL, self.by_id_name(volume_id))

    def after_detach(self, volume_id: str) -> None:
        with self._lock:
            timer = self.pending_attach.pop(volume_id, None)
            if timer is not None:
                timer.cancel()
            loop = self.loops.pop(volume_id, None)
            if loop:
                self._unpublish(loop, self.by_id_name(volume_id))
                self._detach_loop(loop)

    def take_snapshot(self, snapshot_id: str, volume_id: str) -> None:
        started = time.time()
        for fn in list(self.on_snapshot):
            fn(snapshot_id, volume_id)
        if self.snapshot_delay:
            time.sleep(self.snapshot_delay)
        with self._lock:
            src = self.volume_file(volume_id)
            if os.path.exists(src):
                self._copy(src, self.snapshot_file(snapshot_id))
            self.snapshot_log.append({"snapshot_id": snapshot_id, "volume_id": volume_id,
                                      "started": started, "copied": time.time()})

    def copy_snapshot_file(self, source_id: str, new_id: str) -> None:
        with self._lock:
            if os.path.exists(self.snapshot_file(source_id)):
                self._copy(self.snapshot_file(source_id), self.snapshot_file(new_id))

    def after_modify(self, volume: Any) -> None:
        with self._lock:
            self._ensure_file(volume.id, volume.size)
            loop = self.loops.get(volume.id)
            if loop:
                self.runner.run(["losetup", "-c", loop], timeout=60)

    def remove_file(self, path: str) -> None:
        with self._lock:
            if os.path.exists(path):
                os.unlink(path)

    # ---- test helpers (in-process only) ---------------------------------------------------------

    @staticmethod
    def set_snapshot(snapshot_id: str, state: Optional[str] = None, start_time: Any = None) -> None:
        """Set a snapshot's state (``pending``...) or start time in moto, which makes every snapshot
        ``completed`` at once."""
        snap = _find_snapshot(snapshot_id)
        if state is not None:
            snap.status = state
        if start_time is not None:
            snap.start_time = start_time

    # ---- install / cleanup ----------------------------------------------------------------------

    def install(self) -> "LocalBlockDevices":
        global _ACTIVE
        _patch_moto()
        _ACTIVE = self
        return self

    def uninstall(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    def cleanup(self) -> None:
        """Detach every loop device made here (lazily if still mounted) and remove the trees."""
        self.uninstall()
        with self._lock:
            self._closed = True
            for timer in self.pending_attach.values():
                timer.cancel()
            self.pending_attach.clear()
            for vid, loop in list(self.loops.items()):
                self._unpublish(loop, self.by_id_name(vid))
                self._detach_loop(loop)
            self.loops.clear()
            for loop in self.extra_loops:
                self._unpublish(loop)
                self._detach_loop(loop)
            self.extra_loops.clear()

    def __enter__(self) -> "LocalBlockDevices":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


def _find_snapshot(snapshot_id: str) -> Any:
    from moto.ec2.models import ec2_backends

    for account in ec2_backends.values():
        for region in list(account.keys()):
            backend = account[region]
            if snapshot_id in backend.snapshots:
                return backend.snapshots[snapshot_id]
    raise KeyError(snapshot_id)


def _patch_moto() -> None:
    """Wrap moto's EBS backend methods once; the wrappers defer to whichever sim is active."""
    if _ORIGINALS:
        return
    from moto.ec2.models import EC2Backend
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore

    def wrap(cls: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
        original = getattr(cls, name)
        _ORIGINALS[f"{cls.__name__}.{name}"] = original
        setattr(cls, name, functools.wraps(original)(make(original)))

    def response_create_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any) -> Any:
            _TOKEN.value = self._get_param("ClientToken")
            try:
                return orig(self)
            finally:
                _TOKEN.value = None
        return fn

    def create_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, *a: Any, **kw: Any) -> Any:
            sim = _ACTIVE
            if sim is not None:
                existing = sim.existing_for_token(self)
                if existing is not None:
                    return existing
            volume = orig(self, *a, **kw)
            return sim.after_create_volume(volume) if sim is not None else volume
        return fn

    def attach_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, volume_id: str, instance_id: str, *a: Any, **kw: Any) -> Any:
            att = orig(self, volume_id, instance_id, *a, **kw)
            sim = _ACTIVE
            if sim is not None and att is not None:
                try:
                    device_path = a[0] if a else kw.get("device_path", "")
                    root = getattr(self.get_instance(instance_id), "root_device_name", "")
                    sim.after_attach(self.get_volume(volume_id), instance_id, device_path, root)
                except Exception:
                    _ORIGINALS["EC2Backend.detach_volume"](self, volume_id, instance_id, None)
                    raise
            return att
        return fn

    def detach_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, volume_id: str, *a: Any, **kw: Any) -> Any:
            att = orig(self, volume_id, *a, **kw)
            if _ACTIVE is not None:
                _ACTIVE.after_detach(volume_id)
            return att
        return fn

    def create_snapshot(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, volume_id: str, *a: Any, **kw: Any) -> Any:
            snap = orig(self, volume_id, *a, **kw)
            if _ACTIVE is not None:
                _ACTIVE.take_snapshot(snap.id, volume_id)
            return snap
        return fn

    def copy_snapshot(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, source_snapshot_id: str, *a: Any, **kw: Any) -> Any:
            snap = orig(self, source_snapshot_id, *a, **kw)
            if _ACTIVE is not None:
                _ACTIVE.copy_snapshot_file(source_snapshot_id, snap.id)
            return snap
        return fn

    def modify_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, volume_id: str, *a: Any, **kw: Any) -> Any:
            vol = orig(self, volume_id, *a, **kw)
            if _ACTIVE is not None:
                _ACTIVE.after_modify(vol)
            return vol
        return fn

    def delete_volume(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, volume_id: str) -> Any:
            vol = orig(self, volume_id)
            if _ACTIVE is not None:
                _ACTIVE.remove_file(_ACTIVE.volume_file(volume_id))
            return vol
        return fn

    def delete_snapshot(orig: Any) -> Callable[..., Any]:
        def fn(self: Any, snapshot_id: str) -> Any:
            snap = orig(self, snapshot_id)
            if _ACTIVE is not None:
                _ACTIVE.remove_file(_ACTIVE.snapshot_file(snapshot_id))
            return snap
        return fn

    wrap(ElasticBlockStore, "create_volume", response_create_volume)
    for name, make in [("create_volume", create_volume), ("attach_volume", attach_volume),
                       ("detach_volume", detach_volume), ("create_snapshot", create_snapshot),
                       ("copy_snapshot", copy_snapshot), ("modify_volume", modify_volume),
                       ("delete_volume", delete_volume), ("delete_snapshot", delete_snapshot)]:
        wrap(EC2Backend, name, make)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="local AWS (moto) whose EBS volumes are real loop devices")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--root", required=True, help="directory for backing files")
    parser.add_argument("--dev-root", required=True)
    parser.add_argument("--sys-root", required=True)
    parser.add_argument("--size-cap-mib", type=int, default=512)
    parser.add_argument("--record", default=None, help="append lifecycle calls as JSON lines to this file")
    from agent.sim.localaws import LocalAWS, add_mode_args, settings_from_args

    add_mode_args(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    sim = LocalBlockDevices(args.root, args.dev_root, args.sys_root, size_cap=args.size_cap_mib * MiB).install()
    server = LocalAWS(args.port, args.record, strict=settings is not None, settings=settings).start()
    print(server.url, flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sim.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
