"""The local dataset manifest: what we downloaded, object version by object version, in SQLite.

Why SQLite (stdlib) and not a JSON file: a million rows must be read in key order without holding
them in memory (the planner merge-joins them with the S3 listing), and every completed file must be
recorded as it completes so that a crash (kill -9, power loss) loses at most the last batch — and
those few are adopted on the next run by hashing them against their ETag, not fetched again.
The TEXT primary key's BINARY collation sorts like S3 (UTF-8 bytes). WAL + synchronous=NORMAL keeps
the writes cheap and the file consistent after a crash.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from typing import Iterable, Iterator, List, Optional, Tuple

from agent.transfer.planner import Download, ManifestEntry

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (key TEXT PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL,
                                  etag TEXT NOT NULL, mtime_ns INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"""


def manifest_path(state_dir: str, source: str, dest: str) -> str:
    digest = hashlib.sha256(f"{source}\n{os.path.abspath(dest)}".encode()).hexdigest()[:16]
    return os.path.join(state_dir, "datasets", f"{digest}.sqlite")


class LocalManifest:
    """One connection, used from one thread (the sync's coordinator)."""

    def __init__(self, path: str, source: str = "", dest: str = "") -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA temp_store=FILE")
        self.db.executescript(SCHEMA)
        self.db.execute("DROP TABLE IF EXISTS plan")
        self.db.execute("DROP TABLE IF EXISTS remote")
        self.db.execute("DROP TABLE IF EXISTS stale")
        self.db.execute("CREATE TABLE plan (seq INTEGER PRIMARY KEY, key TEXT, path TEXT, size INTEGER, etag TEXT, verify INTEGER)")
        self._pending: List[Tuple[str, str, int, str, int]] = []
        self._deletes: List[str] = []
        self._last_flush = time.monotonic()
        self.db.execute("CREATE TABLE stale (key TEXT PRIMARY KEY, path TEXT, size INTEGER, mtime_ns INTEGER) WITHOUT ROWID")
        if source:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('source', ?), ('dest', ?)", (source, dest))
        # The planner reads the manifest in key order while the coordinator writes the plan: a second
        # connection reads a consistent snapshot (WAL) without holding up the writer.
        self.rdb = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    # -- reading ------------------------------------------------------------------------------
    def entries(self, batch: int = 2000) -> Iterator[ManifestEntry]:
        # A separate cursor so the coordinator can write while the planner reads.
        cur = self.rdb.execute("SELECT key, path, size, etag, mtime_ns FROM files ORDER BY key")
        while True:
            rows = cur.fetchmany(batch)
            if not rows:
                return
            for r in rows:
                yield ManifestEntry(*r)

    def lookup(self, key: str) -> Optional[ManifestEntry]:
        row = self.rdb.execute("SELECT key, path, size, etag, mtime_ns FROM files WHERE key = ?", (key,)).fetchone()
        return ManifestEntry(*row) if row else None

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    # -- the plan (on disk: a million pending downloads must not live in RAM) --------------------
    def add_plan(self, items: Iterable[Download]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO plan (key, path, size, etag, verify) VALUES (?, ?, ?, ?, ?)",
                            ((d.key, d.path, d.size, d.etag, int(d.verify)) for d in items))
        self.db.execute("COMMIT")

    def plan_items(self, batch: int = 500) -> Iterator[Download]:
        last = 0
        while True:
            rows = self.db.execute("SELECT seq, key, path, size, etag, verify FROM plan WHERE seq > ? ORDER BY seq LIMIT ?",
                                   (last, batch)).fetchall()
            if not rows:
                return
            for seq, key, path, size, etag, verify in rows:
                last = seq
                yield Download(key, path, size, etag, bool(verify), "")

    def add_stale(self, entries: Iterable[ManifestEntry]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO stale VALUES (?, ?, ?, ?)", ((e.key, e.path, e.size, e.mtime_ns) for e in entries))
        self.db.execute("COMMIT")

    def stale_items(self, batch: int = 1000) -> Iterator[ManifestEntry]:
        last = ""
        while True:
            rows = self.db.execute("SELECT key, path, size, mtime_ns FROM stale WHERE key > ? ORDER BY key LIMIT ?", (last, batch)).fetchall()
            if not rows:
                return
            for key, path, size, mtime_ns in rows:
                last = key
                yield ManifestEntry(key, path, size, "", mtime_ns)

    def drop_stale_rows(self) -> None:
        self.flush()
        self.db.execute("DELETE FROM files WHERE key IN (SELECT key FROM stale)")

    # -- remote paths, only for delete = true ----------------------------------------------------
    def start_remote(self) -> None:
        self.db.execute("CREATE TABLE remote (path TEXT PRIMARY KEY) WITHOUT ROWID")

    def add_remote(self, paths: Iterable[str]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR IGNORE INTO remote VALUES (?)", ((p,) for p in paths))
        self.db.execute("COMMIT")

    def is_remote(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM remote WHERE path = ?", (path,)).fetchone() is not None

    def has_remote_under(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM remote WHERE path > ? AND path < ? LIMIT 1", (path + "/", path + "0")).fetchone() is not None

    # -- writing ---------------------------------------------------------------------------------
    def record(self, key: str, path: str, size: int, etag: str, mtime_ns: int) -> None:
        self._pending.append((key, path, size, etag, mtime_ns))
        self.maybe_flush()

    def forget(self, key: str) -> None:
        self._deletes.append(key)
        self.maybe_flush()

    def maybe_flush(self, every: float = 0.25, rows: int = 500) -> None:
        if len(self._pending) + len(self._deletes) >= rows or time.monotonic() - self._last_flush >= every:
            self.flush()

    def flush(self) -> None:
        if self._pending or self._deletes:
            self.db.execute("BEGIN")
            if self._pending:
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", self._pending)
            if self._deletes:
                self.db.executemany("DELETE FROM files WHERE key = ?", ((k,) for k in self._deletes))
            self.db.execute("COMMIT")
            self._pending.clear()
            self._deletes.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
            self.db.execute("DROP TABLE IF EXISTS plan")
            self.db.execute("DROP TABLE IF EXISTS remote")
            self.db.execute("DROP TABLE IF EXISTS stale")
        finally:
            self.rdb.close()
            self.db.close()
