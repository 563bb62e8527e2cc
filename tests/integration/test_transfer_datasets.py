"""Dataset sync against a real moto server (and the fault proxy in front of it)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

from agent.config import DatasetSection, TransferSection
from agent.sim.faultproxy import Fault, FaultProxy
from agent.transfer.datasets import SyncProgress, sync_dataset
from agent.transfer.keys import TEMP_PREFIX
from tests.integration.transfer_helpers import all_files, client, put_tree, tree_hashes

BUCKET = "data-bucket"
MiB = 1024 * 1024


def small_transfer(**kw) -> TransferSection:
    t = TransferSection(concurrency=8, part_size=5 * MiB, multipart_threshold=5 * MiB)
    for k, v in kw.items():
        setattr(t, k, v)
    return t


@pytest.fixture
def bucket(aws):
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws.s3


@pytest.fixture
def proxy(aws):
    p = FaultProxy(aws.url).start()
    yield p
    p.stop()


def corpus(n: int = 30, big: int = 1) -> dict:
    files = {f"d{i % 4}/sub/f{i:03d}.bin": os.urandom(1000 + 37 * i) for i in range(n)}
    files["empty"] = b""
    for j in range(big):
        files[f"big{j}.tar"] = os.urandom(12 * MiB + 12345)  # 3 ranged GETs of 5 MiB
    return files


def no_temp_files(root: str) -> bool:
    return not [p for p in all_files(root) if os.path.basename(p).startswith(TEMP_PREFIX)]


def test_sync_is_byte_identical_and_resync_fetches_nothing(bucket, proxy, tmp_path):
    want = put_tree(bucket, BUCKET, "ds/", corpus())
    dest = str(tmp_path / "dest")
    ds = DatasetSection(source=f"s3://{BUCKET}/ds", dest=dest)
    seen = []
    r = sync_dataset(client(proxy.url), ds, small_transfer(), str(tmp_path / "state"), progress=seen.append)
    assert r.ok, r.error_messages
    assert r.files == len(want) and r.skipped == 0
    assert r.bytes == sum(len(v) for v in corpus(0, 0).values()) or r.bytes > 12 * MiB
    assert tree_hashes(dest) == want
    ranged = [q for q in proxy.requests if q.method == "GET" and q.path.endswith("big0.tar")]
    assert len(ranged) == 3 and all(q.range.startswith("bytes=") for q in ranged)
    assert seen and isinstance(seen[-1], SyncProgress) and seen[-1].bytes_done == seen[-1].bytes_total
    assert seen[-1].files_done == seen[-1].files_total == len(want)

    gets_before = proxy.count("GET", query_contains="")
    objects_gets = lambda: sum(1 for q in proxy.requests if q.method == "GET" and "list-type" not in q.query)  # noqa: E731
    n_obj = objects_gets()
    r2 = sync_dataset(client(proxy.url), ds, small_transfer(), str(tmp_path / "state"))
    assert r2.ok and r2.files == 0 and r2.skipped == len(want)
    assert objects_gets() == n_obj, "a re-sync with nothing changed must not GET any object"
    assert proxy.count("GET") > gets_before  # it did list


def test_same_size_update_is_downloaded_again(bucket, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {"a.txt": b"AAAA", "b.txt": b"BBBB"})
    dest = str(tmp_path / "dest")
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=dest)
    assert sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st")).ok
    # Same size, and we even make the local mtime equal to what it was: only the ETag can tell.
    st = os.stat(os.path.join(dest, "a.txt"))
    bucket.put_object(Bucket=BUCKET, Key="ds/a.txt", Body=b"ZZZZ")
    r = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
    assert r.ok and r.files == 1 and r.skipped == 1
    assert open(os.path.join(dest, "a.txt"), "rb").read() == b"ZZZZ"
    assert os.stat(os.path.join(dest, "a.txt")).st_size == st.st_size


def test_local_modification_is_repaired_and_identical_local_file_is_adopted(bucket, proxy, tmp_path):
    want = put_tree(bucket, BUCKET, "ds/", {"keep.bin": os.urandom(5000), "touched.bin": os.urandom(5000)})
    dest = tmp_path / "dest"
    dest.mkdir()
    # A tree filled by another tool: identical content, no manifest. It must be hashed, not fetched.
    (dest / "keep.bin").write_bytes(bucket.get_object(Bucket=BUCKET, Key="ds/keep.bin")["Body"].read())
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest))
    r = sync_dataset(client(proxy.url), ds, small_transfer(), str(tmp_path / "st"))
    assert r.ok and r.adopted == 1 and r.files == 1
    assert proxy.count("GET", f"/{BUCKET}/ds/keep.bin") == 0
    # Someone scribbles over a synced file with the same size: the mtime changes, so it is re-checked.
    with open(dest / "touched.bin", "r+b") as fh:
        fh.write(b"\0" * 10)
    r = sync_dataset(client(proxy.url), ds, small_transfer(), str(tmp_path / "st"))
    assert r.ok and r.files == 1, r
    assert tree_hashes(str(dest)) == want


HOSTILE = ["ds/../evil", "ds//abs", "ds/a\\b", "ds/a//b", "ds/dir/", "ds/a/../../x", "ds/x", "ds/x/y",
           "ds/./dot", "ds/.spot-agent-sync/manifest", "ds/good.txt", "ds/empty-folder/"]


def test_hostile_keys_never_leave_dest_and_each_is_reported(bucket, tmp_path):
    for k in HOSTILE:
        bucket.put_object(Bucket=BUCKET, Key=k, Body=b"" if k == "ds/empty-folder/" else b"payload:" + k.encode())
    listed = {o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert listed == set(HOSTILE), "moto must store the hostile keys verbatim for this test to mean anything"
    root = tmp_path / "jail"
    dest = root / "a" / "dest"
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest))
    r = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
    refused = ["ds/../evil", "ds//abs", "ds/a\\b", "ds/a//b", "ds/dir/", "ds/a/../../x", "ds/x/y", "ds/./dot",
               "ds/.spot-agent-sync/manifest"]
    assert r.errors == len(refused), r.error_messages
    for k in refused:
        assert any(repr(k) in m for m in r.error_messages), f"{k} not reported: {r.error_messages}"
    assert any("conflict" in m and "'ds/x/y'" in m for m in r.error_messages)
    assert any("'ds/empty-folder/'" in n for n in r.notes)
    # Only the good file and 'x' were written, and nothing anywhere outside dest.
    everything = sorted(os.path.relpath(p, root) for p in all_files(str(root)))
    inside = [p for p in everything if not p.startswith(os.path.join("a", "dest", ".spot-agent-sync"))]
    assert inside == [os.path.join("a", "dest", "good.txt"), os.path.join("a", "dest", "x")]
    assert not os.path.exists("/abs") or not open("/abs", "rb").read().startswith(b"payload:")
    assert not (tmp_path / "evil").exists() and not (root / "evil").exists() and not (root / "a" / "evil").exists()


def test_local_file_dir_conflict_is_reported_and_does_not_stop_the_rest(bucket, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {"p/q": b"1", "r": b"2", "s/t": b"3"})
    dest = tmp_path / "dest"
    (dest / "r").mkdir(parents=True)  # a local directory where S3 has a file
    (dest / "p").write_bytes(b"local file where S3 needs a directory")
    r = sync_dataset(bucket, DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest)), small_transfer(), str(tmp_path / "st"))
    assert r.errors == 2 and r.files == 1
    assert any("ds/p/q" in m and "conflict" in m for m in r.error_messages)
    assert any("ds/r" in m and "directory" in m for m in r.error_messages)
    assert (dest / "s" / "t").read_bytes() == b"3"


@pytest.mark.parametrize("kind", ["slowdown", "reset", "truncate", "short"])
def test_faults_are_retried_to_an_exact_tree(bucket, proxy, tmp_path, kind):
    files = corpus(n=12)
    want = put_tree(bucket, BUCKET, "ds/", files)
    # Break the 2nd, 4th and 5th object GET (small and ranged alike) and every 3rd range of the big file.
    proxy.set_faults([Fault(kind, method="GET", path_contains="/ds/d", nth={2, 4, 5}),
                      Fault(kind, method="GET", path_contains="big0.tar", nth={1, 3})])
    seen_partial = []

    def watch(p: SyncProgress) -> None:
        # A reader never sees a partial file: every visible non-temp file is complete.
        for path in all_files(str(tmp_path / "dest")):
            rel = os.path.relpath(path, tmp_path / "dest")
            if not os.path.basename(path).startswith(TEMP_PREFIX) and rel in files and os.path.getsize(path) != len(files[rel]):
                seen_partial.append(rel)

    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(tmp_path / "dest"))
    r = sync_dataset(client(proxy.url), ds, small_transfer(), str(tmp_path / "st"), progress=watch)
    assert r.ok, r.error_messages
    assert tree_hashes(str(tmp_path / "dest")) == want
    faulted = [q for q in proxy.requests if q.fault == kind]
    assert len(faulted) == 5, faulted
    assert no_temp_files(str(tmp_path / "dest")) and not seen_partial
    if kind != "slowdown":  # botocore itself retries a 503; broken bodies are ours to retry
        assert r.retries >= 5


def test_persistent_failure_is_a_per_key_error(bucket, proxy, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {"ok.bin": b"fine", "cursed.bin": b"x" * 5000})
    proxy.set_faults([Fault("reset", method="GET", path_contains="cursed.bin", every=1)])
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(tmp_path / "dest"))
    r = sync_dataset(client(proxy.url, attempts=2), ds, small_transfer(), str(tmp_path / "st"))
    assert r.errors == 1 and r.files == 1 and "cursed.bin" in r.error_messages[0] and "gave up" in r.error_messages[0]
    assert not (tmp_path / "dest" / "cursed.bin").exists() and no_temp_files(str(tmp_path / "dest"))


def test_include_exclude_and_delete(bucket, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {"a.tar": b"a", "b.tar": b"b", "c.txt": b"c", "sub/d.tar": b"d", "sub/skip.tar": b"s"})
    dest = tmp_path / "dest"
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest), include=["*.tar"], exclude=["sub/skip*"], delete=True)
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "gone.tar").write_bytes(b"stale")
    (dest / "notes.txt").write_bytes(b"outside the include globs: out of scope, kept")
    r = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
    assert r.ok and r.files == 3 and r.deleted == 1
    assert sorted(tree_hashes(str(dest))) == ["a.tar", "b.tar", "notes.txt", os.path.join("sub", "d.tar")]
    assert not (dest / "old").exists()
    bucket.delete_object(Bucket=BUCKET, Key="ds/b.tar")
    r = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
    assert r.ok and r.deleted == 1 and not (dest / "b.tar").exists() and r.skipped == 2


def test_stop_event_stops_promptly_and_leaves_no_partial_files(bucket, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {f"f{i}": os.urandom(64 * 1024) for i in range(40)})
    stop = threading.Event()
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(tmp_path / "dest"))

    def progress(p: SyncProgress) -> None:
        if p.files_done >= 3:
            stop.set()

    r = sync_dataset(bucket, ds, small_transfer(max_bandwidth=512 * 1024, concurrency=2), str(tmp_path / "st"), progress=progress, stop=stop)
    assert r.stopped and not r.ok and 3 <= r.files < 40
    assert no_temp_files(str(tmp_path / "dest"))  # in-flight temps are discarded on stop
    r2 = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
    assert r2.ok and r2.skipped == r.files and r2.files == 40 - r.files
    assert no_temp_files(str(tmp_path / "dest"))


def test_full_disk_is_a_clear_error_and_temp_files_are_removed(bucket, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        put_tree(bucket, BUCKET, "ds/", {f"f{i}": os.urandom(300 * 1024) for i in range(5)})
        dest = mnt / "dest"
        ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(dest))

        # Up-front check: 1.5 MB needed, fits; then the disk fills before the downloads start.
        def fill(p: SyncProgress) -> None:
            if not (mnt / "filler").exists():
                with open(mnt / "filler", "wb") as fh:
                    try:
                        fh.write(b"\0" * (1800 * 1024))
                    except OSError:
                        pass

        r = sync_dataset(bucket, ds, small_transfer(concurrency=2), str(tmp_path / "st"), progress=fill)
        assert not r.ok and r.errors >= 1
        assert any("no space left" in m for m in r.error_messages), r.error_messages
        assert no_temp_files(str(dest))
        os.unlink(mnt / "filler")
        (mnt / "hog").write_bytes(b"\0" * (1900 * 1024))
        r = sync_dataset(bucket, ds, small_transfer(), str(tmp_path / "st"))
        assert any("not enough space" in m for m in r.error_messages), r.error_messages
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_kill_9_mid_sync_resumes_without_refetching_completed_files(bucket, proxy, tmp_path):
    files = {f"part/{i:03d}.bin": os.urandom(64 * 1024) for i in range(60)}
    want = put_tree(bucket, BUCKET, "ds/", files)
    dest = tmp_path / "dest"
    cmd = [sys.executable, "-m", "agent", "sync", f"s3://{BUCKET}/ds/", str(dest), "--endpoint-url", proxy.url,
           "--json", "--concurrency", "4"]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(cmd + ["--max-bandwidth", "300K"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_at_kill = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            done_at_kill = [os.path.relpath(p, dest) for p in all_files(str(dest))
                            if "/part/" in p and not os.path.basename(p).startswith(TEMP_PREFIX)]
            if len(done_at_kill) >= 12:
                break
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9
    assert 12 <= len(done_at_kill) < 60, "the throttle must leave work for the resumed run"
    # Everything visible is complete (renamed only after verification).
    for rel in done_at_kill:
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == want[rel]
    n_before = {rel: proxy.count("GET", f"/{BUCKET}/ds/{rel}") for rel in files}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    summary = json.loads(out.stdout)
    assert summary["errors"] == 0 and summary["files"] + summary["skipped"] == 60
    assert tree_hashes(str(dest)) == want
    refetched = [rel for rel in done_at_kill if proxy.count("GET", f"/{BUCKET}/ds/{rel}") != n_before[rel]]
    assert refetched == [], f"completed files fetched again: {refetched}"
    assert no_temp_files(str(dest))


def test_cli_json_summary_and_usage_errors(bucket, aws, tmp_path):
    put_tree(bucket, BUCKET, "ds/", {"a": b"1", "b/c": b"22"})
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "agent", "sync", f"s3://{BUCKET}/ds", str(tmp_path / "d"), "--endpoint-url",
                          aws.url, "--json"], env=env, capture_output=True, text=True, timeout=60)
    import json

    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert (s["files"], s["bytes"], s["skipped"], s["errors"]) == (2, 3, 0, 0) and s["seconds"] >= 0
    assert os.path.isdir(tmp_path / "d" / ".spot-agent-sync")
    bad = subprocess.run([sys.executable, "-m", "agent", "sync", "http://nope", str(tmp_path / "d")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "s3://" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, "-m", "agent", "sync", f"s3://{BUCKET}/ds", str(tmp_path / "d"), "--max-bandwidth", "fast"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "fast" in bad.stderr


@pytest.mark.parametrize("kind", ["slowdown", "reset", "short"])
def test_botocore_engine_survives_the_same_faults(bucket, proxy, tmp_path, kind):
    want = put_tree(bucket, BUCKET, "ds/", corpus(n=6))
    proxy.set_faults([Fault(kind, method="GET", path_contains="/ds/d", nth={1, 3}),
                      Fault(kind, method="GET", path_contains="big0.tar", nth={2})])
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(tmp_path / "dest"))
    r = sync_dataset(client(proxy.url), ds, small_transfer(engine="botocore"), str(tmp_path / "st"))
    assert r.ok, r.error_messages
    assert tree_hashes(str(tmp_path / "dest")) == want and no_temp_files(str(tmp_path / "dest"))
    assert len([q for q in proxy.requests if q.fault == kind]) == 3


def test_presigned_path_hands_over_to_botocore_on_a_redirect(bucket, proxy, tmp_path):
    want = put_tree(bucket, BUCKET, "ds/", {f"f{i}": os.urandom(2000) for i in range(5)})
    proxy.set_faults([Fault("redirect", method="GET", path_contains="/ds/f", nth={1})])
    ds = DatasetSection(source=f"s3://{BUCKET}/ds/", dest=str(tmp_path / "dest"))
    r = sync_dataset(client(proxy.url), ds, small_transfer(concurrency=1), str(tmp_path / "st"))
    assert r.ok, r.error_messages
    assert tree_hashes(str(tmp_path / "dest")) == want
    gets = [q for q in proxy.requests if q.method == "GET" and q.path.startswith(f"/{BUCKET}/ds/f")]
    assert gets[0].fault == "redirect" and "X-Amz-Signature" in gets[0].query
    assert all("X-Amz-Signature" not in q.query for q in gets[1:])  # botocore's signed headers from then on
