"""`lampy worker`'s trust model (docs/security.md): only signed registry requests, each lambda's
files unreadable to other lambdas' sandboxes, files holding the secret 0600 in 0700 folders,
loopback unless told otherwise."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from lampy._errors import OptionError
from lampy.cli import main
from lampy.runtime._secret import private_dir, write_private
from lampy.runtime.openlambda import _worker as worker_module

from .test_worker import JSON_F, install, request, run_json, signed, tarball

THIEF_F = """
import json
def f(event):
    found = {}
    for path in event["paths"]:
        try:
            with open(path, "rb") as file:
                found[path] = file.read()[:40].decode(errors="replace")
        except OSError as exc:
            found[path] = type(exc).__name__
    return found
"""
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="one user per lambda needs root")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/registry/evil", tarball({"f.py": JSON_F})),
        ("DELETE", "/registry/echo", None),
        ("GET", "/registry/", None),
        ("GET", "/registry/echo/config", None),
    ],
    ids=["upload", "delete", "list", "config"],
)
def test_unsigned_and_wrongly_signed_registry_requests_are_refused(
    make_worker: Any, method: str, path: str, body: bytes | None
) -> None:
    worker = make_worker()
    install(worker.url, "echo", {"f.py": JSON_F})
    for headers in ({}, signed(method, path, body, secret=b"not the worker's secret")):
        status, _, text = request(worker.url, method, path, body, False, **headers)
        assert status == 401 and b"registry request refused" in text
    assert run_json(worker.url, "echo", {})[0] == 200  # nothing was changed
    assert "evil" not in worker.worker.lambdas


def test_a_replayed_or_altered_upload_is_refused(make_worker: Any) -> None:
    worker = make_worker()
    body = tarball({"f.py": JSON_F})
    headers = signed("POST", "/registry/echo", body)
    assert request(worker.url, "POST", "/registry/echo", body, False, **headers)[0] == 201
    status, _, text = request(worker.url, "POST", "/registry/echo", body, False, **headers)
    assert status == 401 and b"seen before" in text
    other = tarball({"f.py": JSON_F + "\n# another body, another length\n"})
    headers = signed("POST", "/registry/echo", body)  # the length is signed
    assert request(worker.url, "POST", "/registry/echo", other, False, **headers)[0] == 401
    swapped = bytearray(body)
    swapped[-1] ^= 1  # same length: the signed SHA-256 is what catches it
    headers = signed("POST", "/registry/echo", body)
    status, _, text = request(
        worker.url, "POST", "/registry/echo", bytes(swapped), False, **headers
    )
    assert status == 400 and b"SHA-256" in text


@root_only
def test_a_lambda_cannot_read_another_lambdas_files_nor_the_registry(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "victim", {"f.py": JSON_F, ".env": "GREETING=the-secret-value\n"})
    install(worker.url, "thief", {"f.py": THIEF_F})
    victim = worker.worker.lambdas["victim"].directory
    paths = [
        str(victim / ".env"),
        str(victim / "f.py"),
        str(worker.worker.registry / "victim.tar.gz"),
        str(Path.home() / ".config" / "lampy" / "secret"),
    ]
    status, body = run_json(worker.url, "thief", {"paths": paths})
    assert status == 200
    found = json.loads(body)
    assert set(found.values()) <= {"PermissionError", "FileNotFoundError"}, found
    assert found[paths[0]] == "PermissionError"
    # the victim itself still reads its own .env
    assert json.loads(run_json(worker.url, "victim", {})[1])["env"] == "the-secret-value"


def test_secret_files_are_0600_in_folders_only_their_user_enters(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "echo", {"f.py": JSON_F, ".env": "LAMPY_SECRET=s\n"})
    registry, workdir = worker.worker.registry, worker.worker.workdir
    assert stat.S_IMODE(registry.stat().st_mode) == 0o700
    assert stat.S_IMODE((registry / "echo.tar.gz").stat().st_mode) == 0o600
    folder = worker.worker.lambdas["echo"].directory
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # a worker run as root lets sandbox users pass through (0711) to their own folder only
    assert stat.S_IMODE(workdir.stat().st_mode) == (0o711 if os.geteuid() == 0 else 0o700)
    if os.geteuid() == 0:
        assert folder.stat().st_uid != 0


def test_private_files_and_folders(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    assert stat.S_IMODE(private_dir(loose).stat().st_mode) == 0o700
    target = tmp_path / "out.tar.gz"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OptionError, match="not a directory of this user"):
        private_dir(link)


@root_only
def test_a_registry_folder_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, 12345, 12345)
    with pytest.raises(OptionError, match="choose another path"):
        worker_module.Worker(planted)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_a_non_loopback_address_needs_the_explicit_flag(host: str) -> None:
    with pytest.raises(OptionError, match="--expose-run-to-network"):
        worker_module.serve(host=host)


def test_cli_refuses_a_public_host_with_a_one_line_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["worker", "--host", "192.0.2.1"]) == 2  # refused before the port is probed
    error = capsys.readouterr().err
    assert "not a loopback address" in error and len(error.strip().splitlines()) == 1


def test_loopback_addresses_need_no_flag() -> None:
    assert all(map(worker_module._loopback, ["127.0.0.1", "127.8.9.1", "::1", "localhost"]))


def test_without_root_sandboxes_run_as_the_workers_user(make_worker: Any) -> None:
    """The fallback a worker not run as root takes (docs/security.md says what it gives up)."""
    worker = make_worker()
    worker.worker.isolated = False
    install(worker.url, "echo", {"f.py": JSON_F, ".env": "GREETING=plain\n"})
    assert worker.worker.lambdas["echo"].uid is None
    assert json.loads(run_json(worker.url, "echo", {})[1])["env"] == "plain"


def test_sandboxes_get_how_numpy_computes_here_and_no_other_setting() -> None:
    """A sandbox's numpy picks the kernels the client's does on this machine (the same bits),
    and learns nothing else of the worker's environment."""
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MKL_CBWR", "NPY_DISABLE_CPU_FEATURES"):
        assert worker_module._passed_to_sandboxes(name), name
    for name in ("LAMPY_SECRET", "AWS_SECRET_ACCESS_KEY", "PYTHONPATH", "LD_PRELOAD"):
        assert not worker_module._passed_to_sandboxes(name), name
