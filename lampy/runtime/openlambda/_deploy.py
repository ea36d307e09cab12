"""`lampy deploy`: build the self-contained lambda tarball, and upload it to a worker.

The sandbox has only what `requirements.txt` lists, not lampy, so lampy's own source travels
inside the tarball under `lampy/`: all of it (it is small), because a pickled argument may refer
to any lampy object (a method region's `self` holds a ParallelFunction). Importing lampy needs
only numpy and cloudpickle; aiohttp and tenacity are imported by the caller-side modules alone.
`requirements.txt` pins the caller's exact numpy and cloudpickle (and their dependencies), since
pickles move between the two ends; `.env` carries the secret that signs frames, so the tarball
is written 0600 (`save`) and its upload is signed, its bytes hashed under the signature
(`lampy worker` refuses unsigned registry requests; OpenLambda's own registry checks nothing).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

from lampy.runtime._secret import load_secret, write_private
from lampy.runtime.remote import _auth as auth

PINNED = ("numpy", "cloudpickle")
F_PY = '''"""lampy's handler for OpenLambda: a WSGI app taking signed binary frames (see lampy/)."""

from lampy.runtime.openlambda._handler import app

__all__ = ["app"]
'''


def requirements() -> list[str]:
    """`name==version` for numpy, cloudpickle and everything they need, as installed here."""
    pins: dict[str, str] = {}
    todo = list(PINNED)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in pins:
            continue
        dist = metadata.distribution(name)
        pins[key] = f"{dist.metadata['Name']}=={dist.version}"
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
    return sorted(pins.values(), key=str.lower)


def build(secret: bytes | None = None) -> bytes:
    """The lambda as a tar.gz, ready for POST /registry/<name>."""
    root = Path(__file__).resolve().parents[2]
    files = {
        "f.py": F_PY.encode(),
        "requirements.txt": ("\n".join(requirements()) + "\n").encode(),
        ".env": b"LAMPY_SECRET=" + (secret or load_secret()) + b"\n",
    }
    for path in sorted(root.rglob("*.py")):
        files[f"lampy/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(time.time())
            info.mode = 0o600 if name == ".env" else 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def save(path: Path, secret: bytes | None = None) -> None:
    """Write the tarball to `path`, readable by this user only (it holds the secret)."""
    write_private(path, build(secret))


def upload(url: str, name: str = "lampy", secret: bytes | None = None) -> str:
    """POST the tarball to `url`/registry/`name`, signed; the worker's answer, or an error
    saying why."""
    key = secret or load_secret()
    data = build(key)
    target = f"/registry/{name}"
    signed = auth.sign(key, "POST", target, "", str(len(data)), hashlib.sha256(data).hexdigest())
    request = urllib.request.Request(
        f"{url.rstrip('/')}{target}",
        data=data,
        method="POST",
        headers={"Content-Type": "application/gzip", "Content-Length": str(len(data)), **signed},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text: str = answer.read().decode(errors="replace").strip()
            if answer.status != 201:
                raise RuntimeError(f"expected 201 from {request.full_url}, got {answer.status}")
            return text
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip().removeprefix(f"{exc.code}: ")
        said = (body.splitlines() or [exc.reason])[0]  # servers often repeat the status
        raise RuntimeError(f"{request.full_url} answered {exc.code}: {said}") from None
