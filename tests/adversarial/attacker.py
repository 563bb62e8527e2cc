"""The hostile job: run as the unprivileged job uid (stdlib only; started by conftest's ``Job``).

Commands (argv):
  swap A B [C D..]  exchange A and B (and C and D...) with renameat2(RENAME_EXCHANGE) in a tight
                    loop until killed; prints "ready" once every pair was exchanged once.
  exec CODE         run Python code (one-off set-ups: symlinks, renames, files the job owns).
"""

from __future__ import annotations

import ctypes
import os
import sys

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def swap_loop(pairs: "list[tuple[str, str]]") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    encoded = [(a.encode(), b.encode()) for a, b in pairs]
    for a, b in encoded:
        if fn(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            print(f"renameat2 failed: {os.strerror(err)}", flush=True)
            sys.exit(1)
    print("ready", flush=True)
    while True:
        for a, b in encoded:
            fn(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "swap":
        args = sys.argv[2:]
        swap_loop(list(zip(args[0::2], args[1::2])))
    elif cmd == "exec":
        exec(compile(sys.argv[2], "<attack>", "exec"), {"os": os, "exchange": exchange})
    else:
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
