"""The `lampy` command: `lampy worker` (a local OpenLambda-compatible worker), `lampy deploy`,
`lampy serve` (an array server for remote arrays) and `lampy calibrate` (measure the lazy
arrays' cost constants on this machine).

Mistakes are answered in one line on stderr, never a traceback: exit status 2 for a mistake in
the command line, 1 for a failure (a port in use, nothing listening, a file that cannot be
written, a directory to serve that is not one).
`--debug` or LAMPY_DEBUG=1 adds the traceback, for bug reports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TextIO

from lampy import __version__

WORKER_PORT = 5000  # OpenLambda's own default (go/common/config.go)
SERVE_PORT = 5050


class Failure(Exception):
    """A command that cannot do its work: printed as one line, exit status 1."""


class Usage(Exception):
    """A value argparse could not check itself (a --chaos plan): exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the message and where help is), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def debugging(flag: bool = False) -> bool:
    """Whether to show tracebacks: `--debug`, or LAMPY_DEBUG set to anything but "" or "0"."""
    return flag or os.environ.get("LAMPY_DEBUG", "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """An exception as one line: its first line, with its type when the message is empty."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def port(text: str) -> int:
    """A TCP port number for argparse (0 lets the system choose)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type for numbers above zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def check_port_free(host: str, number: int) -> None:
    """Fail before any banner when the address cannot be bound (in use, or not this machine's).

    The servers bind with SO_REUSEADDR, as this probe does, so a port left in TIME_WAIT by a
    server that just stopped is free for both.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, number))
        except socket.gaierror:
            raise Failure(f"--host {host}: no such address") from None
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise Failure(
                    f"port {number} on {host} is in use (another lampy worker or server?); "
                    "stop it or choose another with --port"
                ) from None
            raise Failure(f"cannot listen on {host}:{number}: {exc.strerror}") from None


def worker_url(text: str) -> str:
    """An argparse type for `deploy --url`: an http(s) URL with a host."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http URL; write it like http://{text.split('://')[-1]}"
        )
    return text.rstrip("/")


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help that keeps the description's lines and shows every default that is set."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> Parser:
    parser = Parser(prog="lampy", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"lampy {__version__}")
    # --debug is accepted before or after the command; SUPPRESS keeps the subcommand's default
    # from overwriting a --debug given before it.
    parser.add_argument("--debug", action="store_true", help="show tracebacks (or LAMPY_DEBUG=1)")
    common = Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks (or LAMPY_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> Parser:
        sub = commands.add_parser(name, help=help, parents=[common], formatter_class=Formatter)
        assert isinstance(sub, Parser)
        return sub

    worker = command("worker", "run an OpenLambda-compatible worker")
    worker.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 127.0.0.1 serves this machine only"
    )
    worker.add_argument("--port", type=port, default=WORKER_PORT, help="TCP port")
    worker.add_argument(
        "--expose-run-to-network",
        action="store_true",
        help="allow a non-loopback --host: anyone who reaches it can call every lambda's /run "
        "and read /stats (registry requests stay signed)",
    )
    worker.add_argument(
        "--registry",
        type=Path,
        help="directory of uploaded lambdas, made 0700 (default: ~/.cache/lampy/registry)",
    )
    worker.add_argument("--max-sandboxes", type=positive(int), help="default: twice the CPU count")
    worker.add_argument(
        "--runtime-limit", type=positive(float), default=30.0, help="seconds per call"
    )
    worker.add_argument(
        "--chaos",
        metavar="PLAN",
        help="inject faults into calls, e.g. 'kill=0.05,502=0.05,429=0.05,hang=0.02,"
        "reset=0.02,corrupt=0.01,duplicate=0.02' (for testing; counts in /stats)",
    )
    worker.add_argument("--chaos-seed", type=int, default=0, help="seed of the --chaos plan")

    deploy = command("deploy", "build lampy's lambda and upload or save it")
    target = deploy.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--url", type=worker_url, help="the OpenLambda worker, e.g. http://127.0.0.1:5000"
    )
    target.add_argument("--output", type=Path, help="write the tar.gz here instead")
    deploy.add_argument("--name", default="lampy", help="the lambda's name")
    deploy.add_argument(
        "--timeout",
        type=positive(float),
        default=600.0,
        help="seconds to wait until the lambda answers (OpenLambda pip-installs its "
        "requirements on the first call); default 600",
    )
    deploy.add_argument(
        "--no-wait", action="store_true", help="upload only, do not wait until it answers"
    )

    command("calibrate", "measure lazy-array cost constants on this machine")

    server = command("serve", "serve the .npy files of a directory by range")
    server.add_argument("directory", type=Path)
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 127.0.0.1 serves this machine only"
    )
    server.add_argument("--port", type=port, default=SERVE_PORT, help="TCP port")
    server.add_argument(
        "--max-upload", type=positive(int), help="largest PUT in bytes (default 8 GiB)"
    )
    server.add_argument(
        "--job-ttl",
        type=positive(float),
        default=24 * 3600.0,
        help="seconds a lambda-orchestrated job's files are kept after its last activity "
        "(default a day; a fetched result removes them at once)",
    )

    job = command("job", "show a job orchestrated in lambdas (lampy.submit), or cancel it")
    job.add_argument("id", help="the job's id, JOB@STORE as JobHandle.id prints it")
    job.add_argument("--store", help="the job store's URL, when ID is the 32 hex digits alone")
    job.add_argument("--cancel", action="store_true", help="stop the job")
    job.add_argument(
        "--watch", action="store_true", help="show its progress every second until it ends"
    )
    return parser


def _job(args: argparse.Namespace) -> int:
    from lampy._errors import OptionError
    from lampy.runtime.openlambda._detached import cancel, describe, parse_id, status

    try:
        store, job = parse_id(args.id, args.store)
    except OptionError as exc:
        raise Usage(str(exc)) from None
    shown = cancel(store, job) if args.cancel else status(store, job)
    print(describe(shown, store))
    while args.watch and shown["state"] == "running":
        time.sleep(1.0)
        shown = status(store, job)
        print(describe(shown, store).splitlines()[0], flush=True)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from lampy.lazy._cost import calibrate

    for constant, value in sorted(calibrate().items()):
        unit = "flop/s" if constant.startswith("gemm_flops") else "s per element"
        print(f"{constant:>18}  {value:.3g} {unit}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lampy.runtime.remote._server import MAX_UPLOAD_BYTES
    from lampy.runtime.remote._server import serve as serve_arrays

    if not args.directory.is_dir():
        # SystemExit, as the server itself says it: callers of main() rely on it.
        raise SystemExit(f"lampy serve: {args.directory} is not a directory")
    check_port_free(args.host, args.port)
    serve_arrays(
        args.directory, args.host, args.port, args.max_upload or MAX_UPLOAD_BYTES, args.job_ttl
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from lampy._errors import OptionError
    from lampy.runtime.openlambda._chaos import FaultPlan
    from lampy.runtime.openlambda._worker import check_exposure, serve

    try:
        plan = None if args.chaos is None else FaultPlan.parse(args.chaos, args.chaos_seed)
        check_exposure(args.host, args.expose_run_to_network)
    except OptionError as exc:
        raise Usage(str(exc)) from None
    if args.registry is not None and args.registry.exists() and not args.registry.is_dir():
        raise Failure(f"--registry {args.registry} is not a directory")
    check_port_free(args.host, args.port)
    limit, expose = args.runtime_limit, args.expose_run_to_network
    serve(args.host, args.port, args.registry, args.max_sandboxes, limit, plan, expose)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from lampy.runtime.openlambda import _deploy as packaging
    from lampy.runtime.openlambda._protocol import run_url

    names = packaging.deployed(args.name)
    if args.output is not None:
        try:
            packaging.save(args.output)
        except OSError as exc:
            raise Failure(f"cannot write {args.output}: {exc.strerror}") from None
        print(
            f"wrote {args.output} (mode 0600: it holds the secret); upload it to OpenLambda "
            f"twice, as {' and '.join(names)}: curl --data-binary @{args.output} "
            f"http://HOST:{WORKER_PORT}/registry/NAME (lampy worker takes signed uploads only: "
            "lampy deploy --url)"
        )
        return 0
    _check_worker(args.url)
    try:
        print(packaging.upload(args.url, args.name), flush=True)
    except (RuntimeError, OSError) as exc:
        raise Failure(f"upload to {args.url} failed: {one_line(exc)}") from None
    if args.no_wait:
        return 0
    shown = Progress(sys.stderr)
    try:
        took = packaging.wait_answering(
            args.url, args.name, timeout=args.timeout, progress=shown.update
        )
    except packaging.DeployError as exc:
        shown.end()
        raise Failure(f"{args.name} uploaded but not ready: {exc}") from None
    shown.end()
    where = " and ".join(run_url(args.url, name) for name in names)
    print(f"{args.name} answers at {where} (ready after {took:.1f} s)")
    return 0


class Progress:
    """One line that says how long `deploy` has waited: rewritten in place on a terminal,
    a new line each time elsewhere (a log), and cleared when the wait ends."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.shown = stream, False
        self.live = stream.isatty()

    def update(self, seconds: float, last: str) -> None:
        line = (
            f"waiting for the lambda to answer: {seconds:.0f} s (the first call installs "
            f"requirements.txt on OpenLambda; last: {last})"
        )
        if self.live:
            self.stream.write("\r\033[K" + line[: shutil.get_terminal_size().columns - 1])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.live and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _check_worker(url: str) -> None:
    """Fail with a hint unless `url` answers like an OpenLambda worker (`GET /status`: ready)."""
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=10) as answer:
            text = answer.read(64).decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        exc.close()
        raise Failure(
            f"{url} is not an OpenLambda worker: GET /status answered {exc.code} {exc.reason}"
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
        raise Failure(
            f"nothing answers at {url} ({reason}); start a worker there "
            f"(`lampy worker --port {urllib.parse.urlsplit(url).port or 80}`) or check --url"
        ) from None
    except OSError as exc:
        raise Failure(f"no answer from {url}: {one_line(exc)}") from None
    if text != "ready":
        raise Failure(f"{url} is not an OpenLambda worker: GET /status answered {text[:40]!r}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "worker": _worker,
    "deploy": _deploy,
    "calibrate": _calibrate,
    "serve": _serve,
    "job": _job,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lampy` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"lampy {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debugging(args.debug):
            traceback.print_exc()
        if isinstance(exc, Usage):
            print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
            return 2
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
