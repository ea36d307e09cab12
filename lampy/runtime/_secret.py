"""The shared secret that signs frames and requests, and what keeps it and its signatures safe.

The secret is LAMPY_SECRET, or one generated once and kept in the user's config dir
($XDG_CONFIG_HOME/lampy/secret, else ~/.config/lampy/secret) with mode 0600, so `lampy deploy`
and later calls agree without setup. Every file lampy writes that holds it is 0600 in a
directory only its owner can enter (`private_dir`, `write_private`).

A signature alone can be replayed, so every signed message also carries its time and a random
nonce: `Freshness` refuses a time outside the window (or not a finite number) and a nonce it has
seen, remembering a bounded number of them (see its docstring for how the bound stays sound).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import secrets
import stat
import threading
import time
from collections import deque
from pathlib import Path

from lampy._errors import OptionError

WINDOW_S = 300.0  # how far a signed message's time may be from the receiver's clock
NONCE_BYTES = 16
NONCES_KEPT = 1 << 18  # nonces remembered per process (about 30 MB at most)


def secret_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "lampy" / "secret"


def load_secret() -> bytes:
    """LAMPY_SECRET if set; else the kept secret, generated on first use."""
    given = os.environ.get("LAMPY_SECRET")
    if given:
        return given.encode()
    return _kept(secret_path())


@functools.cache
def _kept(path: Path) -> bytes:
    """The secret kept at `path`, made on first use; read once per process (every signed
    request asks for it)."""
    if not path.exists():
        private_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter (0700), made if missing.

    Refuses a directory (or a symlink) owned by someone else: a directory another user made
    in advance, in a shared place such as /tmp, is how a secret would leak to them.
    """
    if not path.is_symlink():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OptionError(
            f"{path} is not a directory of this user (uid {os.geteuid()}); lampy keeps files "
            "holding the secret only in its own user's directories: choose another path"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `path` with mode 0600 (files holding the secret): through a new file moved into
    place, so an existing file's wider mode and a planted symlink are never used."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def sweep_parts(root: Path) -> int:
    """Remove the `.part` files under `root` that no live writer holds (writers keep an
    exclusive flock on them while writing; a process killed mid-write left them behind)."""
    removed = 0
    for path in root.rglob(".*.part"):
        with contextlib.suppress(OSError), open(path, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being written
            path.unlink()
            removed += 1
    return removed


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


class Freshness:
    """Refuses signed messages that are too old, from the future, or seen before.

    Nonces are remembered until they leave the window. When more than `kept` are remembered,
    the oldest are forgotten and the window's start moves past their times: a message at or
    before that floor is refused as too old to check, so a forgotten nonce can never be
    replayed. Thread-safe: the handler and the client's loop may share one.
    """

    def __init__(self, window: float = WINDOW_S, kept: int = NONCES_KEPT) -> None:
        self.window, self.kept = window, kept
        self._seen: set[bytes] = set()
        self._order: deque[tuple[float, bytes]] = deque()
        self._floor = -math.inf
        self._lock = threading.Lock()

    def check(self, when: float, nonce: bytes) -> str | None:
        """None when (`when`, `nonce`) is fresh and new, and remembers it; else why not."""
        if not math.isfinite(when):
            return f"its time {when!r} is not a finite number"
        now = time.time()
        if abs(now - when) > self.window:
            return (
                f"its time is {now - when:+.0f} s from this clock (window {self.window:g} s): "
                "an old message replayed, or clocks that differ (synchronise them with NTP)"
            )
        with self._lock:
            while self._order and (
                len(self._order) >= self.kept or self._order[0][0] < now - self.window
            ):
                old, forgotten = self._order.popleft()
                self._seen.discard(forgotten)
                self._floor = max(self._floor, old)
            if when <= self._floor:
                return "its time is older than the nonces this side still remembers"
            if nonce in self._seen:
                return "its nonce was seen before: a replayed message"
            self._seen.add(nonce)
            self._order.append((when, nonce))
        return None
