"""`lampy worker` over real HTTP on loopback: every endpoint and error answer of openlambda.md."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import tarfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lampy.runtime.remote import _auth as auth

JSON_F = """
import json, os, time
def f(event):
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("crash"):
        os._exit(1)
    return {"event": event, "pid": os.getpid(), "env": os.environ.get("GREETING")}
"""
WSGI_APP = """
def app(environ, start_response):
    body = environ["wsgi.input"].read()
    out = [environ["REQUEST_METHOD"].encode(), b" ", environ["PATH_INFO"].encode(), b" ", body]
    start_response("200 OK", [("Content-Length", str(sum(map(len, out)))), ("X-Echo", "1")])
    return out
"""
SLOW_TO_LOAD_F = """
import time
time.sleep(30)  # code that takes long to load: its sandbox is not ready for 30 s
def f(event):
    return "old"
"""
NO_LENGTH_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"an answer without its length"]
"""


def tarball(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, text in files.items():
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def request(
    url: str, method: str, path: str, body: bytes | None = None, sign: bool = True, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One request; registry requests are signed as `lampy deploy` signs them, unless not
    to `sign` (then the headers go as given)."""
    if sign and path.startswith("/registry"):
        headers |= signed(method, path, body)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def signed(
    method: str, path: str, body: bytes | None = None, secret: bytes | None = None
) -> dict[str, str]:
    """The signature headers of a registry request (a body is hashed under it)."""
    key = secret or os.environ["LAMPY_SECRET"].encode()
    length = "" if body is None else str(len(body))
    digest = "" if body is None else hashlib.sha256(body).hexdigest()
    return auth.sign(key, method, path, "", length, digest)


def install(url: str, name: str, files: dict[str, str]) -> None:
    status, _, body = request(url, "POST", f"/registry/{name}", tarball(files))
    assert (status, body) == (201, f"Lambda {name} uploaded successfully".encode())


def run_json(url: str, name: str, event: dict[str, Any]) -> tuple[int, bytes]:
    status, _, body = request(url, "POST", f"/run/{name}", json.dumps(event).encode())
    return status, body


def test_status_stats_and_registry(make_worker: Any) -> None:
    worker = make_worker()
    assert request(worker.url, "GET", "/status")[::2] == (200, b"ready\n")
    fresh = json.loads(request(worker.url, "GET", "/stats")[2])
    assert fresh["cold_starts"] == fresh["warm_starts"] == fresh["requests"] == 0
    assert json.loads(request(worker.url, "GET", "/registry/")[2]) == []
    install(worker.url, "echo", {"f.py": JSON_F, ".env": "GREETING='hi there'\n"})
    yaml = "triggers:\n  http:\n  - method: POST\n"
    install(worker.url, "web", {"f.py": WSGI_APP, "ol.yaml": yaml})
    assert json.loads(request(worker.url, "GET", "/registry/")[2]) == ["echo", "web"]
    status, _, body = request(worker.url, "GET", "/registry/web/config")
    assert status == 200
    assert body == (
        b'{"Triggers":{"HTTP":[{"Method":"POST"}],"Cron":null,"Kafka":null},'
        b'"Environment":{},"ReuseSandbox":true}\n'
    )
    assert request(worker.url, "GET", "/registry/nope/config")[0] == 404
    assert request(worker.url, "DELETE", "/registry/web")[::2] == (
        200,
        b"Lambda web deleted successfully",
    )
    assert request(worker.url, "DELETE", "/registry/web")[::2] == (500, b"lambda web not found\n")
    assert json.loads(request(worker.url, "GET", "/registry/")[2]) == ["echo"]
    stats = json.loads(request(worker.url, "GET", "/stats")[2])
    assert isinstance(stats, dict)


def test_json_lambda_env_cold_and_warm(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "echo", {"f.py": JSON_F, ".env": "GREETING='hi there'\n"})
    status, body = run_json(worker.url, "echo", {"x": 1})
    answer = json.loads(body)
    assert status == 200 and answer["event"] == {"x": 1} and answer["env"] == "hi there"
    status, body = run_json(worker.url, "echo", {"x": 2})
    assert json.loads(body)["pid"] == answer["pid"]  # the warm sandbox served it
    # an empty body is the event {}; a chunked body without Content-Length reads as empty
    assert json.loads(request(worker.url, "POST", "/run/echo")[2])["event"] == {}
    stats = json.loads(request(worker.url, "GET", "/stats")[2])
    assert stats["cold_starts"] == 1 and stats["warm_starts"] == 2


def test_wsgi_app_gets_method_path_and_raw_body(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "web", {"f.py": WSGI_APP})
    payload = bytes(range(256)) * 1000
    status, headers, body = request(worker.url, "PUT", "/run/web/extra/path", payload)
    assert status == 200 and headers["X-Echo"] == "1"
    assert body == b"PUT /extra/path " + payload


def test_error_answers(make_worker: Any) -> None:
    worker = make_worker()
    methods = "triggers:\n  http:\n  - method: GET\n  - method: POST\n"
    install(worker.url, "web", {"f.py": WSGI_APP, "ol.yaml": methods})
    install(worker.url, "broken", {"f.py": "import no_such_module\ndef f(event): ...\n"})
    status, headers, body = request(worker.url, "GET", "/run/")
    assert status == 500 and body.startswith(b"expected invocation format: /run/<lambda-name>")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, body = request(worker.url, "POST", "/run/x")
    assert status == 500 and body.startswith(b'lambda "x" not found in blob store (')
    status, _, body = request(worker.url, "PUT", "/run/web")
    assert status == 405
    assert body == b"HTTP method not allowed. Sent: PUT, Allowed: [GET POST]\n"
    status, _, body = request(worker.url, "POST", "/run/broken")  # as OpenLambda: a 502
    assert status == 502 and body.startswith(b"RoundTrip failed: ")
    assert b"no_such_module" in body  # and the reason, which OpenLambda keeps in its log
    status, _, body = request(worker.url, "POST", "/registry/bad%20name!", b"x")
    assert (status, body) == (
        400,
        b'invalid function name "bad name!"; must match ^[A-Za-z0-9\\.\\-\\_]+$\n',
    )
    status, _, body = request(worker.url, "POST", "/registry/junk", b"not a tarball")
    assert (status, body) == (
        500,
        b"Failed to add lambda: failed to extract config from temp tarball: "
        b"invalid .gz file: gzip: invalid header\n",
    )


def test_runtime_limit_kills_the_sandbox_with_502(make_worker: Any) -> None:
    worker = make_worker(runtime_limit=0.5)
    install(worker.url, "echo", {"f.py": JSON_F})
    install(worker.url, "endless", {"f.py": NO_LENGTH_APP})
    pid = json.loads(run_json(worker.url, "echo", {})[1])["pid"]
    status, body = run_json(worker.url, "echo", {"sleep": 2})
    assert status == 502 and body.startswith(b"RoundTrip failed: ")
    assert b"Sandbox State: " in body and b"runtime limit" in body
    assert json.loads(run_json(worker.url, "echo", {})[1])["pid"] != pid  # a new sandbox
    status, body = run_json(worker.url, "echo", {"crash": True})
    assert status == 502 and b"RoundTrip failed: " in body and b"Sandbox State: exited" in body
    # without Content-Length the answer never ends, as in OpenLambda: the limit cuts it
    status, _, body = request(worker.url, "GET", "/run/endless")
    assert status == 502 and body.startswith(b"RoundTrip failed: ")


def test_full_queue_answers_429(make_worker: Any) -> None:
    worker = make_worker(max_sandboxes=1, queue_limit=2)
    install(worker.url, "echo", {"f.py": JSON_F})
    run_json(worker.url, "echo", {})
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: run_json(worker.url, "echo", {"sleep": 0.3}), range(6)))
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(429) >= 3 and statuses.count(200) >= 1, statuses
    assert all(body == b"lambda function queue is full\n" for s, body in answers if s == 429)


def test_scales_up_under_load_and_back_down(make_worker: Any, monkeypatch: Any) -> None:
    from lampy.runtime.openlambda import _worker as module

    monkeypatch.setattr(module, "IDLE_GRACE_S", 0.2)
    worker = make_worker(max_sandboxes=3)
    install(worker.url, "echo", {"f.py": JSON_F})
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: run_json(worker.url, "echo", {"sleep": 0.2}), range(8)))
    assert all(status == 200 for status, _ in answers)
    pids = {json.loads(body)["pid"] for _, body in answers}
    assert 1 < len(pids) <= 3, pids
    assert time.monotonic() - start < 1.6  # 8 x 0.2 s on one sandbox would take 1.6 s
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if json.loads(request(worker.url, "GET", "/stats")[2])["sandboxes"] == 1:
            break
        time.sleep(0.1)
    assert json.loads(request(worker.url, "GET", "/stats")[2])["sandboxes"] == 1


def test_upload_replaces_the_code(make_worker: Any) -> None:
    worker = make_worker()
    install(worker.url, "v", {"f.py": "def f(event):\n    return 1\n"})
    assert run_json(worker.url, "v", {}) == (200, b"1")
    install(worker.url, "v", {"f.py": "def f(event):\n    return 2\n"})
    assert run_json(worker.url, "v", {}) == (200, b"2")
    assert request(worker.url, "DELETE", "/registry/v")[0] == 200
    assert run_json(worker.url, "v", {})[1].startswith(b'lambda "v" not found')


def test_new_code_serves_a_call_whose_sandbox_was_still_starting(make_worker: Any) -> None:
    """Code replaced while a call's sandbox loads the old code: the starting sandbox is
    stopped and the new version answers at once (not after the old sandbox is ready)."""
    worker = make_worker()
    install(worker.url, "v", {"f.py": SLOW_TO_LOAD_F})
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(run_json, worker.url, "v", {})
        time.sleep(1.0)  # its sandbox is loading the old code
        install(worker.url, "v", {"f.py": "def f(event):\n    return 'new'\n"})
        assert call.result(timeout=15) == (200, b'"new"')
    stats = json.loads(request(worker.url, "GET", "/stats")[2])
    assert stats["sandboxes"] == 1 and stats["sandboxes_created"] == 1


def test_a_sandbox_still_starting_does_not_hold_up_a_stopping_worker(
    worker_process: Any,
) -> None:
    """SIGTERM while a sandbox loads slow code: the worker stops it and exits at once, and
    the waiting call is answered (before, the worker lived until the sandbox was ready)."""
    url, process = worker_process()
    install(url, "slow", {"f.py": SLOW_TO_LOAD_F})
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(run_json, url, "slow", {})
        time.sleep(1.0)  # its sandbox is loading the code
        children = _children(process.pid)
        process.terminate()
        process.wait(timeout=10)  # before the fix: about 30 s
        status, body = call.result(timeout=10)
    assert status == 500 and body.startswith(b'lambda "slow" not found')  # as queued calls
    assert children
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def test_idle_sandbox_of_another_lambda_is_evicted_when_full(make_worker: Any) -> None:
    worker = make_worker(max_sandboxes=1)
    install(worker.url, "a", {"f.py": JSON_F})
    install(worker.url, "b", {"f.py": JSON_F})
    assert run_json(worker.url, "a", {})[0] == 200
    assert run_json(worker.url, "b", {})[0] == 200  # a's idle sandbox made room
    stats = json.loads(request(worker.url, "GET", "/stats")[2])
    assert stats["sandboxes_evicted"] == 1 and stats["sandboxes"] == 1


def test_a_caller_gone_before_its_body_costs_no_sandbox(make_worker: Any) -> None:
    """A caller that hangs up before its body arrived (a lost backup call, say) leaves the
    sandbox warm: nothing reached it (OpenLambda, too, keeps it)."""
    worker = make_worker()
    install(worker.url, "echo", {"f.py": JSON_F})
    pid = json.loads(run_json(worker.url, "echo", {})[1])["pid"]
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /run/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)  # the worker has taken the sandbox and waits for the body
    time.sleep(0.3)
    assert json.loads(run_json(worker.url, "echo", {})[1])["pid"] == pid
    stats = json.loads(request(worker.url, "GET", "/stats")[2])
    assert stats["callers_gone"] == 1 and stats.get("roundtrip_failed", 0) == 0
