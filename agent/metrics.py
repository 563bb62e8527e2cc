"""The metric catalogue. Every metric the agent exports is defined here, on one registry.

Components record facts through these objects; the HTTP endpoint only renders the registry. Labels are
bounded by configuration (hook, volume, dataset, checkpoint names) or by small fixed sets (kind, step,
path, code class): no event ids or timestamps as labels. Filesystem and disk figures are read with
psutil at scrape time, so an idle agent does no work for them between scrapes.
"""

from __future__ import annotations

import os
import platform
import threading
from typing import Dict, Iterable, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD = Info("spot_agent_build", "Build information.", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})

STATE = Gauge("spot_agent_state", "1 for the agent's current state.", ["state"], registry=REGISTRY)
STATES = ("starting", "ready", "draining", "drained", "failed")
READY = Gauge("spot_agent_ready", "1 once READY was reached (volumes mounted, datasets warm).", registry=REGISTRY)
LOOP_HEARTBEAT = Gauge("spot_agent_main_loop_heartbeat_timestamp_seconds", "Last time the main loop ran.", registry=REGISTRY)

IMDS_UP = Gauge("spot_agent_imds_up", "1 when the last IMDS request got an answer (any HTTP status below 500).", registry=REGISTRY)
IMDS_REQUESTS = Counter("spot_agent_imds_requests", "IMDS requests by path and status class (2xx, 4xx, 5xx, error).",
                        ["path", "code_class"], registry=REGISTRY)
IMDS_LAST_SUCCESS = Gauge("spot_agent_imds_last_success_timestamp_seconds", "Last successful IMDS poll.", registry=REGISTRY)
IMDS_BAD_ANSWERS = Counter("spot_agent_imds_bad_answers", "IMDS answers that could not be understood, by path and reason.",
                           ["path", "reason"], registry=REGISTRY)
IMDS_NUL_FIELDS = Counter("spot_agent_imds_nul_fields", "IMDS string fields that held a NUL byte (escaped as \\x00), by path.",
                          ["path"], registry=REGISTRY)
IMDS_DISABLED = Gauge("spot_agent_imds_disabled", "1 when IMDS answered 403 (IMDS turned off for this instance).", registry=REGISTRY)

NOTICE_ACTIVE = Gauge("spot_agent_notice_active", "1 while a notice of this kind is active.", ["kind"], registry=REGISTRY)
NOTICES = Counter("spot_agent_notices", "Notices seen, by kind (each latched notice once).", ["kind"], registry=REGISTRY)
DEADLINE = Gauge("spot_agent_termination_deadline_timestamp_seconds", "When the instance is due to go; 0 when none.", registry=REGISTRY)

DRAIN_STEP_SECONDS = Histogram("spot_agent_drain_step_duration_seconds", "Duration of each drain step.", ["step"],
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120), registry=REGISTRY)
DRAINS = Counter("spot_agent_drains", "Drains finished, by result (success, partial, failed).", ["result"], registry=REGISTRY)
DRAIN_LAST_SUCCESS = Gauge("spot_agent_drain_last_success_timestamp_seconds", "Last drain that persisted everything.", registry=REGISTRY)
DRAIN_MARGIN = Gauge("spot_agent_drain_margin_seconds", "Seconds left before the deadline when the last drain finished.", registry=REGISTRY)
SNAPSHOTS = Counter("spot_agent_snapshots_created", "EBS snapshots created.", ["volume"], registry=REGISTRY)
SNAPSHOT_FAILURES = Counter("spot_agent_snapshot_failures", "EBS snapshots that failed.", ["volume"], registry=REGISTRY)
FREEZE_SECONDS = Gauge("spot_agent_last_freeze_duration_seconds", "How long the last fsfreeze window lasted.", ["volume"], registry=REGISTRY)
LIFECYCLE_COMPLETIONS = Counter("spot_agent_lifecycle_actions_completed", "Auto Scaling lifecycle actions completed.", registry=REGISTRY)
LAUNCH_ACTIONS = Counter("spot_agent_launch_lifecycle_actions", "Launching lifecycle actions completed, by result (continue, abandon).",
                         ["result"], registry=REGISTRY)
REBALANCE_OUTCOMES = Counter("spot_agent_rebalance_outcomes", "Rebalance recommendations by what followed (interrupted, none_followed).",
                             ["outcome"], registry=REGISTRY)
REBALANCE_TO_INTERRUPTION = Histogram("spot_agent_rebalance_to_interruption_seconds",
                                      "Seconds from the first rebalance recommendation to the interruption.",
                                      buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400), registry=REGISTRY)

VOLUME_MOUNTED = Gauge("spot_agent_volume_mounted", "1 when the volume is mounted at its mount point.", ["volume", "mountpoint"], registry=REGISTRY)
VOLUME_FAILURES = Counter("spot_agent_volume_failures", "Volumes that could not be brought up.", ["volume"], registry=REGISTRY)

DATASET_BYTES = Counter("spot_agent_dataset_bytes", "Bytes downloaded into datasets.", ["dataset"], registry=REGISTRY)
DATASET_OBJECTS = Counter("spot_agent_dataset_objects", "Objects downloaded into datasets.", ["dataset"], registry=REGISTRY)
DATASET_SKIPPED = Counter("spot_agent_dataset_objects_skipped", "Objects already up to date.", ["dataset"], registry=REGISTRY)
DATASET_ERRORS = Counter("spot_agent_dataset_errors", "Objects that failed or were refused (bad keys, conflicts).", ["dataset"], registry=REGISTRY)
DATASET_LAST_SUCCESS = Gauge("spot_agent_dataset_last_success_timestamp_seconds", "Last sync with no errors.", ["dataset"], registry=REGISTRY)
DATASET_PROGRESS = Gauge("spot_agent_dataset_progress_ratio", "Bytes done / bytes to do in the current sync (1 when done).", ["dataset"], registry=REGISTRY)

CHECKPOINT_LAST_COMMIT = Gauge("spot_agent_checkpoint_last_commit_timestamp_seconds", "Last committed S3 checkpoint.", ["checkpoint"], registry=REGISTRY)
CHECKPOINT_UPLOAD_BYTES = Counter("spot_agent_checkpoint_upload_bytes", "Bytes uploaded for checkpoints.", ["checkpoint"], registry=REGISTRY)
CHECKPOINT_FAILURES = Counter("spot_agent_checkpoint_upload_failures", "Checkpoint uploads that did not commit.", ["checkpoint"], registry=REGISTRY)
CHECKPOINT_RESTORE_FALLBACKS = Counter("spot_agent_checkpoint_restore_fallbacks", "Restores that skipped newer manifests that did not verify.",
                                       ["checkpoint"], registry=REGISTRY)

HOOK_RUNS = Counter("spot_agent_hook_runs", "Hook commands run.", ["hook"], registry=REGISTRY)
HOOK_FAILURES = Counter("spot_agent_hook_failures", "Hook commands that failed or timed out.", ["hook"], registry=REGISTRY)
HOOK_SECONDS = Histogram("spot_agent_hook_duration_seconds", "Hook command run time.", ["hook"],
                         buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)


def set_state(state: str) -> None:
    for s in STATES:
        STATE.labels(state=s).set(1 if s == state else 0)


set_state("starting")


class _MountedVolumes(Collector):
    """Filesystem size/free and disk I/O of the volumes we mounted, read at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mounts: Dict[str, Tuple[str, str]] = {}  # volume name -> (mountpoint, device)

    def set(self, volume: str, mountpoint: str, device: str) -> None:
        with self._lock:
            self._mounts[volume] = (mountpoint, device)
        VOLUME_MOUNTED.labels(volume=volume, mountpoint=mountpoint).set(1)

    def unset(self, volume: str) -> None:
        with self._lock:
            mountpoint, _ = self._mounts.pop(volume, ("", ""))
        if mountpoint:
            VOLUME_MOUNTED.labels(volume=volume, mountpoint=mountpoint).set(0)

    def collect(self) -> Iterable:
        import psutil

        size = GaugeMetricFamily("spot_agent_filesystem_size_bytes", "Size of the volume's filesystem.", labels=["volume", "mountpoint"])
        free = GaugeMetricFamily("spot_agent_filesystem_free_bytes", "Free bytes on the volume's filesystem.", labels=["volume", "mountpoint"])
        rd = CounterMetricFamily("spot_agent_disk_read_bytes", "Bytes read from the volume's device.", labels=["volume", "device"])
        wr = CounterMetricFamily("spot_agent_disk_written_bytes", "Bytes written to the volume's device.", labels=["volume", "device"])
        with self._lock:
            mounts = dict(self._mounts)
        io = {}
        if mounts:
            try:
                io = psutil.disk_io_counters(perdisk=True) or {}
            except Exception:  # noqa: BLE001 - /proc may be unreadable in a container
                io = {}
        for volume, (mountpoint, device) in sorted(mounts.items()):
            try:
                usage = psutil.disk_usage(mountpoint)
            except OSError:
                continue
            size.add_metric([volume, mountpoint], usage.total)
            free.add_metric([volume, mountpoint], usage.free)
            counters = io.get(os.path.basename(os.path.realpath(device)))
            if counters is not None:
                rd.add_metric([volume, device], counters.read_bytes)
                wr.add_metric([volume, device], counters.write_bytes)
        yield size
        yield free
        yield rd
        yield wr


MOUNTED_VOLUMES = _MountedVolumes()
REGISTRY.register(MOUNTED_VOLUMES)


# Known label values start at zero. A series born at 1 shows no increase() to a rule, so a first notice
# or a first failed drain would never alert; and "no notice" should read 0, not absent.
def _zero_known_labels() -> None:
    from agent.events import EVENT_KINDS

    for kind in EVENT_KINDS:
        NOTICE_ACTIVE.labels(kind=kind).set(0)
        NOTICES.labels(kind=kind)
    for result in DRAIN_RESULTS:
        DRAINS.labels(result=result)
    for result in ("continue", "abandon"):
        LAUNCH_ACTIONS.labels(result=result)
    for outcome in ("interrupted", "none_followed"):
        REBALANCE_OUTCOMES.labels(outcome=outcome)


DRAIN_RESULTS = ("success", "partial", "failed")
_zero_known_labels()

# The agent's own CPU, memory and start time (process_*), read from /proc at scrape time. The
# CheckpointStale rule uses process_start_time_seconds to give a fresh agent time to commit once.
from prometheus_client import ProcessCollector  # noqa: E402 - appended section of the catalogue

PROCESS = ProcessCollector(registry=REGISTRY)
