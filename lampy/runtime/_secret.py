"""The shared secret that signs frames: LAMPY_SECRET, or one generated once and kept on disk.

The file lives in the user's config dir ($XDG_CONFIG_HOME/lampy/secret, else
~/.config/lampy/secret) with mode 0600, so `lampy deploy` and later calls agree without setup.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path


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
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()
