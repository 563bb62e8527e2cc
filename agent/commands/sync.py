"""`spot-agent sync s3://bucket/prefix DIR`: the dataset engine by hand, same code as the daemon's pre-warm.

The manifest that makes re-runs incremental and crash-resumable lives in ``DIR/.spot-agent-sync/``
unless ``--state-dir`` says otherwise; that directory is never synced over or deleted by ``--delete``.
Exit status: 0 everything in place, 1 some object failed (each is named on stderr), 2 bad usage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("sync", help="download an S3 prefix into a directory (incremental, verified, resumable)",
                       description="Download s3://bucket/prefix into DIR: incremental, verified, resumable.")
    p.add_argument("source", metavar="s3://bucket/prefix")
    p.add_argument("dest", metavar="DIR")
    p.add_argument("--endpoint-url", default="", help="S3 endpoint (a local S3 emulator); default: AWS")
    p.add_argument("--region", default="", help="AWS region; default: the environment's")
    p.add_argument("--include", action="append", default=[], metavar="GLOB", help="only keys matching (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip keys matching (repeatable)")
    p.add_argument("--delete", action="store_true", help="remove local files that are not in S3")
    p.add_argument("--concurrency", type=int, default=None, help="parallel requests (default 16)")
    p.add_argument("--max-bandwidth", default="0", metavar="RATE", help="bytes/s cap, e.g. 50M; 0 = unlimited")
    p.add_argument("--part-size", default="", metavar="SIZE", help="ranged-GET size for large objects (default 8M)")
    p.add_argument("--engine", choices=["auto", "botocore"], default="auto",
                   help="GET path: auto = presigned GETs over urllib3 (less CPU); botocore = get_object")
    p.add_argument("--state-dir", default="", help="where the manifest lives (default DIR/.spot-agent-sync)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a TTY")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
    from agent.config import DatasetSection, TransferSection, _s3_url
    from agent.transfer.progress import parse_rate, render_bar

    problem = _s3_url(args.source)
    if problem:
        print(f"spot-agent sync: source {problem}", file=sys.stderr)
        return EXIT_USAGE
    transfer = TransferSection()
    try:
        transfer.max_bandwidth = parse_rate(args.max_bandwidth)
        if args.part_size:
            transfer.part_size = max(5 * 1024 * 1024, parse_rate(args.part_size))
    except ValueError as exc:
        print(f"spot-agent sync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.concurrency is not None:
        if not 1 <= args.concurrency <= 256:
            print(f"spot-agent sync: --concurrency must be 1..256, got {args.concurrency}", file=sys.stderr)
            return EXIT_USAGE
        transfer.concurrency = args.concurrency
    transfer.engine = args.engine
    dest = os.path.abspath(args.dest)
    ds = DatasetSection(source=args.source, dest=dest, include=args.include, exclude=args.exclude, delete=args.delete)
    state_dir = os.path.abspath(args.state_dir) if args.state_dir else os.path.join(dest, ".spot-agent-sync")

    s3 = make_s3(args.endpoint_url, args.region, transfer.concurrency)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tty = sys.stderr.isatty() and not args.no_progress

    def progress(p: Any) -> None:
        if tty:
            width = 100
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                pass
            sys.stderr.write("\r" + render_bar(p, width - 1))
            sys.stderr.flush()

    from agent.transfer.datasets import sync_dataset

    result = sync_dataset(s3, ds, transfer, state_dir, progress=progress, stop=stop)
    if tty:
        sys.stderr.write("\n")
    for msg in result.error_messages:
        print(f"spot-agent sync: error: {msg}", file=sys.stderr)
    if args.json:
        summary = {"files": result.files, "bytes": result.bytes, "skipped": result.skipped, "errors": result.errors,
                   "seconds": round(result.seconds, 3), "deleted": result.deleted, "adopted": result.adopted,
                   "retries": result.retries, "stopped": result.stopped, "error_messages": result.error_messages,
                   "notes": result.notes}
        print(json.dumps(summary))
    elif not tty:
        print(f"{result.files} files ({result.bytes} bytes) downloaded, {result.skipped} up to date, "
              f"{result.deleted} deleted, {result.errors} errors in {result.seconds:.1f}s")
    return EXIT_OK if result.ok else EXIT_FAILED


def make_s3(endpoint_url: str, region: str, concurrency: int) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    cfg = BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=concurrency + 4,
                     connect_timeout=5, read_timeout=60,
                     s3={"addressing_style": "path"} if endpoint_url else {})
    session = boto3.session.Session(region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    return session.client("s3", endpoint_url=endpoint_url or None, config=cfg)
