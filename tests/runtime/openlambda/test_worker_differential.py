"""`lampy worker` against OpenLambda's own worker: the same requests to both, the same answers.

Every request below goes to a fresh `lampy worker` and to the real worker of the session
(tests/olreal.py), signed as `lampy deploy` signs (OpenLambda ignores the signature headers),
and the answers are compared: status, body, and the Content-Type and Location headers. Only
what names a place on each machine is normalised (the registry folder, a sandbox's state after
"Sandbox State:", the paths in a Python traceback). The differences that remain on purpose are
checked at the end, each as what it is, and listed in the README's `lampy worker` part.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.olreal import DIR, REASON, W
from tests.runtime.openlambda.test_worker import WSGI_APP, request, tarball

pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON)

REGISTRY_CACHE_S = 5.5  # OpenLambda serves a lambda's old code up to 5 s (registry_cache_ms)
ECHO = """
import json
def f(event):
    if event.get("boom"):
        raise ValueError("boom")
    return {"event": event}
"""
TOKEN = """
import os, secrets
TOKEN = secrets.token_hex(8)
def f(event):
    return [os.environ.get("GREETING"), TOKEN]
"""
QUERY_APP = """
def app(environ, start_response):
    body = "|".join([environ["REQUEST_METHOD"], environ["SCRIPT_NAME"], environ["PATH_INFO"],
                     environ["QUERY_STRING"], environ["wsgi.input"].read().decode()]).encode()
    length = str(len(body))
    start_response("203 Odd", [("Content-Type", "text/x-odd"), ("Content-Length", length)])
    return [body]
"""
METHODS = "triggers:\n  http:\n  - method: GET\n  - method: POST\nenvironment:\n  A: b c\n"
NO_REUSE = "environment:\n  GREETING: hello <&> there\nreuse-sandbox: false\n"
REFUSED = "diff-refused-"  # the names of uploads both workers refuse


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str | None
    location: str | None


class Server:
    """One of the two workers, with what makes its answers its own."""

    def __init__(self, url: str, registry: str) -> None:
        self.url, self.registry = url, registry

    def send(self, method: str, path: str, body: bytes | None = None) -> Answer:
        try:
            status, headers, got = request(self.url, method, path, body)
        except OSError as exc:
            raise AssertionError(f"{method} {path} to {self.url}: {exc!r}") from exc
        for place in (f"file://{self.registry}", self.registry):
            got = got.replace(place.encode(), b"<registry>")
        return Answer(status, got, headers.get("Content-Type"), headers.get("Location"))


@pytest.fixture
def servers(make_worker: Any, olreal_url: str) -> tuple[Server, Server]:
    """(lampy worker, OpenLambda's worker), neither holding a "diff-" lambda."""
    lampy_worker = make_worker()
    config = json.loads((DIR / W / "config.json").read_text())
    real = Server(olreal_url, config["registry"].removeprefix("file://"))
    names = json.loads(request(olreal_url, "GET", "/registry/")[2])
    for name in names:
        if name.startswith("diff-"):
            request(olreal_url, "DELETE", f"/registry/{name}")
    return Server(lampy_worker.url, str(lampy_worker.worker.registry)), real


def exact(answer: Answer) -> Answer:
    return answer


def until_sandbox_state(answer: Answer) -> Answer:
    """Up to "Sandbox State:", which describes each worker's own sandbox."""
    answer.body = answer.body.partition(b"Sandbox State:")[0]
    return answer


def traceback_end(answer: Answer) -> Answer:
    """The exception line of a Python traceback (the frames are each runtime's own)."""
    answer.body = answer.body.strip().splitlines()[-1]
    return answer


def until_yaml_detail(answer: Answer) -> Answer:
    """Up to the YAML parser's own words (Go's yaml.v3 and PyYAML say it differently)."""
    answer.body = answer.body.partition(b"yaml: ")[0]
    return answer


def round_trip_failed(answer: Answer) -> Answer:
    """A 502's first words (what follows is each worker's account of its own sandbox)."""
    answer.body = answer.body[: len(b"RoundTrip failed: ")]
    return answer


def names(answer: Answer) -> Answer:
    """The listing's "diff-" names, sorted (OpenLambda lists in its map's order), but for
    the refused uploads OpenLambda lists too (checked in test_the_differences_kept_on_purpose)."""
    listed = json.loads(answer.body)
    kept = sorted(n for n in listed if n.startswith("diff-") and not n.startswith(REFUSED))
    answer.body = json.dumps(kept).encode()
    return answer


Case = tuple[str, str, bytes | None, Callable[[Answer], Answer]]
BEFORE: list[Case] = [
    ("GET", "/status", None, exact),
    ("POST", "/status", b"x", exact),
    ("GET", "/nowhere", None, exact),
    ("GET", "/registry", None, exact),
    ("GET", "/registry?x=1", None, exact),
    ("POST", "/run", b"{}", exact),
    ("HEAD", "/run", None, exact),
    ("GET", "//registry/", None, exact),
    ("GET", "/run/../status", None, exact),
    ("POST", "/registry/./diff-x", b"", exact),
    ("GET", "/registry/", None, names),
    ("POST", "/registry/", b"", exact),
    ("DELETE", "/registry/", None, exact),
    ("HEAD", "/registry/", None, exact),
    ("GET", "/registry/diff-x", None, exact),
    ("GET", "/registry/diff-x/code", None, exact),
    ("GET", "/registry/diff-x/config/more", None, exact),
    ("PUT", "/registry/diff-x", b"", exact),
    ("POST", "/registry/a%20b", b"", exact),
    ("POST", "/registry/diff-x/config", b"", exact),
    ("DELETE", "/registry/a%20b", None, exact),
    ("GET", "/registry/a%20b/config", None, exact),
    ("DELETE", "/registry/diff-missing", None, exact),
    ("POST", "/registry/diff-refused-junk", b"not a tarball", exact),
    ("POST", "/registry/diff-refused-empty", b"", exact),
    ("POST", "/registry/diff-refused-short", b"\x1f\x8b\x08", exact),
    (
        "POST",
        "/registry/diff-refused-list",
        tarball({"f.py": ECHO, "ol.yaml": "- method: GET\n"}),
        until_yaml_detail,
    ),
    (
        "POST",
        "/registry/diff-refused-bad",
        tarball({"f.py": ECHO, "ol.yaml": "a: [\n"}),
        until_yaml_detail,
    ),
    (
        "POST",
        "/registry/diff-refused-nomethod",
        tarball({"f.py": ECHO, "ol.yaml": "triggers:\n  http:\n  - method: ''\n"}),
        exact,
    ),
    ("POST", "/registry/diff-echo", tarball({"f.py": ECHO}), exact),
    ("POST", "/registry/diff-web", tarball({"f.py": ECHO, "ol.yaml": METHODS}), exact),
    ("POST", "/registry/diff-token", tarball({"f.py": TOKEN, "ol.yaml": NO_REUSE}), exact),
    ("POST", "/registry/diff-wsgi", tarball({"f.py": QUERY_APP}), exact),
    ("POST", "/registry/diff-echoer", tarball({"f.py": WSGI_APP}), exact),
    (
        "POST",
        "/registry/diff-broken",
        tarball({"f.py": "import no_such_module\ndef f(event): ...\n"}),
        exact,
    ),
    ("GET", "/registry/", None, names),
    ("GET", "/registry/diff-echo/config", None, exact),
    ("GET", "/registry/diff-web/config", None, exact),
    ("GET", "/registry/diff-token/config", None, exact),
    ("POST", "/run/diff-echo", b'{"x": [1, "two"]}', exact),
    ("POST", "/run/diff-echo/", b"", exact),
    ("GET", "/run/diff-echo/more/path", None, exact),
    ("POST", "/run/diff-echo", b'{"boom": 1}', traceback_end),
    ("POST", "/run/diff-echo", b"not json", traceback_end),
    ("PUT", "/run/diff-web", b"{}", exact),
    ("DELETE", "/run/diff-web", None, exact),
    ("GET", "/run/diff-web", None, exact),
    ("POST", "/run/diff-wsgi/a/b?q=1&r=%20", b"payload", exact),
    ("PATCH", "/run/diff-echoer/x", b"\x00\xff" * 1000, exact),
    ("GET", "/run/", None, exact),
    ("GET", "/run/a%20b", None, exact),
    ("GET", "/run/diff-missing", None, exact),
    ("OPTIONS", "/run/diff-missing/x/y", None, exact),
    ("POST", "/run/diff-broken", b"{}", round_trip_failed),
    ("DELETE", "/registry/diff-web", None, exact),
    ("DELETE", "/registry/diff-web", None, exact),
    ("GET", "/registry/", None, names),
]
AFTER_CACHE: list[Case] = [  # once OpenLambda has seen diff-web go (registry_cache_ms)
    ("GET", "/run/diff-web", None, exact),
]


def compare(servers: tuple[Server, Server], cases: list[Case]) -> None:
    mine, real = servers
    differ = []
    for method, path, body, view in cases:
        got, want = view(mine.send(method, path, body)), view(real.send(method, path, body))
        if got != want:
            differ.append(f"{method} {path}:\n  lampy worker: {got}\n  OpenLambda:   {want}")
    assert not differ, "\n".join(differ)


def test_same_requests_same_answers(servers: tuple[Server, Server]) -> None:
    compare(servers, BEFORE)
    time.sleep(REGISTRY_CACHE_S)
    compare(servers, AFTER_CACHE)


def test_reuse_sandbox_false_and_environment(servers: tuple[Server, Server]) -> None:
    """ol.yaml's environment reaches the lambda (quoted as OpenLambda writes `.env`) and
    `reuse-sandbox: false` gives every call a new sandbox, on both workers. The calls are
    spaced: OpenLambda a288ce1 loses a call of such a lambda that arrives while the one
    before it ends (lambdaInstance.go drops it when it breaks out to make a new sandbox; the
    call hangs), a bug `lampy worker` does not copy."""
    for server in servers:
        upload = server.send(
            "POST", "/registry/diff-token", tarball({"f.py": TOKEN, "ol.yaml": NO_REUSE})
        )
        assert upload.status == 201
        answers = []
        for _ in range(3):
            answers.append(json.loads(server.send("POST", "/run/diff-token", b"{}").body))
            time.sleep(0.5)
        assert [greeting for greeting, _ in answers] == ["hello <&> there"] * 3
        assert len({token for _, token in answers}) == 3, server.url


def test_the_differences_kept_on_purpose(servers: tuple[Server, Server]) -> None:
    """What the README's `lampy worker` part lists, as each worker answers it."""
    mine, real = servers
    # Registry requests must be signed on lampy worker; OpenLambda's registry checks nothing.
    status, _, body = request(mine.url, "GET", "/registry/", sign=False)
    assert status == 401 and b"sign it" in body
    assert request(real.url, "GET", "/registry/", sign=False)[0] == 200
    # An upload OpenLambda could never run is refused at once, not at its first call.
    nothing = tarball({"g.py": ECHO})
    assert mine.send("POST", "/registry/diff-nof", nothing).status == 400
    assert real.send("POST", "/registry/diff-nof", nothing).status == 201
    said = real.send("POST", "/run/diff-nof", b"{}")
    assert said.status == 500 and said.body.startswith(b"cannot determine runtime: no f.py")
    # A refused upload, or asking for a missing lambda's config, leaves the name in
    # OpenLambda's listing (its store makes the entry before it reads anything).
    for server in servers:
        assert server.send("GET", "/registry/diff-ghost/config").status == 404
        assert server.send("POST", "/registry/diff-refused-ghost", b"junk").status == 500
    for ghost in (b'"diff-ghost"', b'"diff-refused-ghost"'):
        assert ghost not in mine.send("GET", "/registry/").body
        assert ghost in real.send("GET", "/registry/").body
    # A new version serves at once on lampy worker; OpenLambda looks for new code 5 s after
    # it last took some (registry_cache_ms), and serves the old code until then.
    pulled = 0.0
    for version in (1, 2):
        code = tarball({"f.py": f"def f(event):\n    return {version}\n"})
        for server in servers:
            assert server.send("POST", "/registry/diff-version", code).status == 201
            assert server.send("POST", "/run/diff-version", b"{}").status == 200
            pulled = pulled or time.monotonic()
    assert mine.send("POST", "/run/diff-version", b"{}").body == b"2"
    old = real.send("POST", "/run/diff-version", b"{}").body
    assert old == b"1" or time.monotonic() - pulled > REGISTRY_CACHE_S - 1
    # Its /stats counts lampy's own events (OpenLambda's has per-stage timings).
    assert "requests" in json.loads(mine.send("GET", "/stats").body)
    assert "requests" not in json.loads(real.send("GET", "/stats").body)
    assert re.search(rb"\.cnt", real.send("GET", "/stats").body)
