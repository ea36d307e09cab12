"""The deploy tarball is self-contained and pinned; the CLI writes or uploads it; the secret."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from lampy.cli import main
from lampy.runtime._secret import load_secret
from lampy.runtime.openlambda import _deploy as deploy
from tests.conftest import SECRET

from .test_worker import signed

CLEAN_IMPORT = """
import sys
sys.path[0] = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
class NotInSandbox:  # the sandbox has only requirements.txt: numpy and cloudpickle
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("aiohttp", "tenacity", "scipy"):
            raise ImportError(f"{name} is not installed in the sandbox")
sys.meta_path.insert(0, NotInSandbox())
import lampy
from lampy.runtime.openlambda import _frames as frames
import f
body = frames.encode(frames.PING, 0, b"%s").join()
class Input:
    def __init__(self): self.data = body
    def read(self, n=-1):
        out, self.data = self.data[:n], self.data[n:]
        return out
answer = f.app({"CONTENT_LENGTH": str(len(body)), "wsgi.input": Input()}, lambda *a: None)
frame = frames.decode(bytearray(b"".join(bytes(p) for p in answer)), b"%s")
print(frame.kind == frames.PONG, sorted(m for m in sys.modules if m.startswith("lampy")))
"""


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_tarball_is_pinned_and_carries_the_secret(tmp_path: Path) -> None:
    data = deploy.build(b"s3")
    found = members(data)
    assert {"f.py", "requirements.txt", ".env", "lampy/__init__.py"} <= set(found)
    assert stat.S_IMODE(found[".env"].mode) == 0o600
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    pins = (tmp_path / "requirements.txt").read_text().split()
    assert f"numpy=={np.__version__}" in pins and f"cloudpickle=={cloudpickle.__version__}" in pins
    assert (tmp_path / ".env").read_text() == (
        "LAMPY_SECRET=s3\nOMP_NUM_THREADS=1\nOPENBLAS_NUM_THREADS=1\nMKL_NUM_THREADS=1\n"
    )
    assert "def f(" not in (tmp_path / "f.py").read_text()
    assert (tmp_path / "lampy" / "runtime" / "openlambda" / "_handler.py").exists()


def test_tarball_runs_without_the_installed_lampy(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(deploy.build(b"k")), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    env = {**os.environ, "LAMPY_SECRET": "k"}
    script = CLEAN_IMPORT % ("k", "k")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    ok, modules = done.stdout.split(" ", 1)
    assert ok == "True" and "'lampy.runtime.openlambda._handler'" in modules


def test_cli_deploy_output_and_url(
    tmp_path: Path, worker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "lampy.tar.gz"
    assert main(["deploy", "--output", str(target)]) == 0
    assert "f.py" in members(target.read_bytes())
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # it holds the secret
    assert "twice, as lampy and lampy-coordinator: curl" in capsys.readouterr().out
    assert main(["deploy", "--url", worker_url, "--name", "second"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[-3:-1] == [
        "Lambda second uploaded successfully",
        "Lambda second-coordinator uploaded successfully",
    ]
    assert said[-1].startswith(
        f"second answers at {worker_url}/run/second and {worker_url}/run/second-coordinator "
        "(ready after "
    )
    listing = urllib.request.Request(f"{worker_url}/registry/", headers=signed("GET", "/registry/"))
    with urllib.request.urlopen(listing) as answer:
        assert {"second", "second-coordinator"} <= set(json.loads(answer.read()))
    assert main(["deploy", "--url", "http://127.0.0.1:9", "--name", "x"]) == 1
    assert "lampy deploy:" in capsys.readouterr().err


def test_secret_is_generated_once_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAMPY_SECRET")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    first = load_secret()
    path = tmp_path / "lampy" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 64
    assert load_secret() == first
    monkeypatch.setenv("LAMPY_SECRET", SECRET)
    assert load_secret() == SECRET.encode()
