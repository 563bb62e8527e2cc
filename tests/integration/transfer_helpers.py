"""Shared helpers for the transfer integration tests (trees, hashing, clients through a proxy)."""

from __future__ import annotations

import hashlib
import os
from typing import Dict

import boto3
from botocore.config import Config as BotoConfig


def client(url: str, attempts: int = 5):
    cfg = BotoConfig(retries={"max_attempts": attempts, "mode": "standard"}, max_pool_connections=32,
                     s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30)
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=cfg)


def tree_hashes(root: str, skip_state: bool = True) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        if skip_state and ".spot-agent-sync" in dirs:
            dirs.remove(".spot-agent-sync")
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def put_tree(s3, bucket: str, prefix: str, files: Dict[str, bytes]) -> Dict[str, str]:
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + rel, Body=data)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def all_files(root: str):
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield os.path.join(dirpath, f)
