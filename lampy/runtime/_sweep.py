"""Nothing lampy starts outlives the process that started it, even one killed by SIGKILL.

- A lifeline: one pipe per process whose write end only this process holds. Each child lampy
  starts (local pool workers, the publishing array server) gets the read end and watches it;
  when the parent dies, by any signal, the kernel closes the write end and the child sees end
  of file and leaves. (A parent-death signal would fire when the *thread* that started the
  child ends, and lampy starts children from whichever thread calls it.)
- Claims: a directory lampy creates for the life of this process (`/dev/shm/lampy-publish-*`)
  holds an flock while its owner lives. The kernel drops it when the owner dies, so `sweep`,
  run when lampy next starts such a thing, removes exactly the directories of dead owners.
- SIGTERM is handled like SIGINT (`exit_on_sigterm`): the main thread unwinds, `finally` blocks
  and atexit handlers run, pools and servers stop, instead of the process vanishing mid-job.

`python -m lampy.runtime._sweep FD [--remove DIR] -- ARGS` runs `lampy ARGS` (the CLI, in this
process) watching lifeline FD; when the parent dies it removes DIR and exits.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

_lock = threading.Lock()
_pipe: tuple[int, int] | None = None  # this process's lifeline (read end, write end)
_claims: dict[str, int] = {}  # directory -> descriptor holding its flock


def lifeline() -> int:
    """The read end of this process's lifeline, for a child to inherit (`pass_fds`)."""
    global _pipe
    with _lock:
        if _pipe is None:
            _pipe = os.pipe()  # both ends close-on-exec: only pass_fds hands the read end on
        return _pipe[0]


def _forget_lifeline() -> None:
    """In a forked child: the parent's lifeline and claims are not ours to hand on."""
    global _pipe, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for fd in [*(_pipe or ()), *_claims.values()]:
        os.close(fd)  # the parent's flocks stay: they go with the parent's descriptors
    _pipe = None
    _claims.clear()


os.register_at_fork(after_in_child=_forget_lifeline)


def watch(fd: int, then: Callable[[], object]) -> None:
    """In a child: call `then` (which should end the process) once the parent is gone."""

    def wait() -> None:
        while os.read(fd, 1):
            pass  # nobody writes; only end of file matters
        then()

    threading.Thread(target=wait, name="lampy-lifeline", daemon=True).start()


def claim(directory: Path) -> None:
    """Hold `directory` for this process's life (an flock the kernel drops when it dies)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with _lock:
        _claims[str(directory)] = fd


def release(directory: Path) -> None:
    """Give up the claim on `directory` (once it is removed)."""
    with _lock:
        fd = _claims.pop(str(directory), None)
    if fd is not None:
        os.close(fd)


def sweep(pattern: str) -> list[str]:
    """Remove the directories matching `pattern` that are this user's and whose owner process
    is gone (nobody holds their claim); returns what was removed."""
    import glob  # here: lampy loads this module with its default executor

    removed: list[str] = []
    for path in glob.glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone meanwhile, or not a directory
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner lives
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind the main thread as SIGINT does (as SystemExit, status 143), so
    lampy's pools and servers stop on the way out. Only when nobody else handles SIGTERM, and
    only from the main thread (where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    import argparse  # here: lampy loads this module with its default executor

    parser = argparse.ArgumentParser(prog="python -m lampy.runtime._sweep")
    parser.add_argument("fd", type=int, help="the lifeline's read end, inherited")
    parser.add_argument("--remove", type=Path, help="a directory to remove when the parent goes")
    args = parser.parse_args(argv[:split])

    def orphaned() -> None:
        if args.remove is not None:
            shutil.rmtree(args.remove, ignore_errors=True)
        os._exit(0)

    watch(args.fd, orphaned)
    from lampy.cli import main as lampy

    return lampy(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
