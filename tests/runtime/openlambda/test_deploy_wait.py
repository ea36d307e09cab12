"""`lampy deploy --url` is done when the lambda answers: it waits, says so, and stops at the
first answer that says it never will (pip's own error on OpenLambda)."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest

from lampy.cli import Progress, main
from lampy.runtime._net import free_port
from lampy.runtime.openlambda import _deploy as deploy
from lampy.runtime.openlambda._deploy import DeployError, pip_error, upload, wait_answering
from tests.conftest import SECRET
from tests.olreal import REASON

from .test_worker import install

BUSY = """
def app(environ, start_response):
    start_response("502 Bad Gateway", [("Content-Length", "8")])
    return [b"warming\\n"]
"""
STRANGER = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "5")])
    return [b"hello"]
"""
NOT_WSGI = "def f(event):\n    return 'hello'\n"  # the ping is no JSON: a traceback, 500
# What OpenLambda answered here to the first call of a lambda whose requirement cannot install.
OPENLAMBDA_PIP_FAILURE = (
    "install lambda returned status 500, Body: 'Traceback (most recent call last):\n"
    '  File "/runtimes/python/server_common.py", line 61, in handle_func\n'
    "    result = entry_point(event)\n"
    '  File "/handler/f.py", line 76, in f\n'
    "    raise Exception(f'pip install failed for {pkg} (exit code {e.returncode}): {output}') "
    "from None\n"
    "Exception: pip install failed for no-such-package-lampy==1.0 (exit code 1): ERROR: Could "
    "not find a version that satisfies the requirement no-such-package-lampy==1.0 (from "
    "versions: none)\nERROR: No matching distribution found for no-such-package-lampy==1.0\n'\n"
)


def test_pip_error_keeps_pips_own_words() -> None:
    said = pip_error(OPENLAMBDA_PIP_FAILURE)
    assert said == (
        "pip could not install no-such-package-lampy==1.0 (exit code 1): ERROR: Could not find "
        "a version that satisfies the requirement no-such-package-lampy==1.0 (from versions: "
        "none) ERROR: No matching distribution found for no-such-package-lampy==1.0"
    )
    assert pip_error("lambda function queue is full") is None


def test_waits_through_passing_failures_with_progress_then_times_out(
    make_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = make_worker()
    install(worker.url, "busy", {"f.py": BUSY})
    monkeypatch.setattr(deploy, "PROGRESS_EVERY_S", 0.3)
    monkeypatch.setattr(deploy, "RETRY_AFTER_S", 0.1)
    seen: list[tuple[float, str]] = []
    with pytest.raises(DeployError, match=r"busy did not answer within 1.5 s \(last: HTTP 502"):
        wait_answering(
            worker.url, "busy", timeout=1.5, progress=lambda s, last: seen.append((s, last))
        )
    assert len(seen) >= 3 and all(last.startswith("HTTP 502: warming") for _, last in seen)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_one_wait_says_what_it_heard_and_returns_false_at_its_deadline(
    make_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listening: each refusal is heard, and the wait ends at its deadline with False
    (wait_answering says the time-out); a lambda that answers a pong ends it with True."""
    monkeypatch.setattr(deploy, "RETRY_AFTER_S", 0.05)
    heard: list[str] = []
    nobody = f"http://127.0.0.1:{free_port()}"
    assert not deploy._wait_one(nobody, "x", SECRET.encode(), time.monotonic() + 0.3, heard.append)
    assert heard[0] == deploy.NO_ANSWER and len(heard) >= 2
    assert all("Connection refused" in answer for answer in heard[1:]), heard
    worker = make_worker()
    upload(worker.url, "ponging")
    heard.clear()
    deadline = time.monotonic() + 30
    assert deploy._wait_one(worker.url, "ponging", SECRET.encode(), deadline, heard.append)
    assert heard[0] == deploy.NO_ANSWER


def test_a_lambda_that_is_not_lampy_is_said_at_once(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "stranger", {"f.py": STRANGER})
    with pytest.raises(DeployError, match="answers, but not as this lampy"):
        wait_answering(worker.url, "stranger", timeout=30)
    install(worker.url, "json", {"f.py": NOT_WSGI})
    with pytest.raises(DeployError, match=r"json answered HTTP 500: \w*DecodeError: "):
        wait_answering(worker.url, "json", timeout=30)


def test_progress_is_one_line_on_a_terminal_and_lines_in_a_log() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        shown = Progress(stream)
        shown.update(10.2, "HTTP 502: warming")
        shown.update(20.4, "no answer yet")
        shown.end()
    assert log.getvalue().splitlines()[1].startswith("waiting for the lambda to answer: 20 s")
    assert "\n" not in terminal.getvalue() and terminal.getvalue().endswith("\r\033[K")


def test_deploy_waits_until_lampy_answers(
    worker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--url", worker_url, "--name", "waited", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert (
        f"waited answers at {worker_url}/run/waited and {worker_url}/run/waited-coordinator "
        "(ready after "
    ) in out


def test_no_wait_uploads_only(worker_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--url", worker_url, "--name", "unwaited", "--no-wait"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Lambda unwaited uploaded successfully",
        "Lambda unwaited-coordinator uploaded successfully",
    ]


@pytest.mark.skipif(bool(REASON), reason=REASON)
def test_on_openlambda_a_failed_pip_install_is_reported_in_pips_words(
    olreal_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenLambda pip-installs requirements.txt on the lambda's first call and answers 500
    with the installer's traceback when pip fails: deploy says pip's words, in one line."""
    monkeypatch.setattr(deploy, "requirements", lambda: ["no-such-package-lampy-test==1.0"])
    assert main(["deploy", "--url", olreal_url, "--name", "unpippable", "--timeout", "300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "lampy deploy: unpippable uploaded but not ready: pip could not install "
        "no-such-package-lampy-test==1.0 (exit code 1): ERROR: "
    )
    assert "No matching distribution found for no-such-package-lampy-test==1.0" in err[0]


@pytest.mark.skipif(bool(REASON), reason=REASON)
def test_on_openlambda_deploy_waits_until_lampy_answers(
    olreal_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--url", olreal_url, "--name", "lampy-waited"]) == 0
    assert (
        f"lampy-waited answers at {olreal_url}/run/lampy-waited and "
        f"{olreal_url}/run/lampy-waited-coordinator (ready after "
    ) in capsys.readouterr().out
