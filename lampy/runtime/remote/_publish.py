"""Automatic publishing: large in-memory arguments of a remote job travel by reference.

Pushing a large split array means every byte goes from the client through the platform's
front door (the OpenLambda worker) into each sandbox. Instead, when an array is larger than
`PUBLISH_BYTES`, the client writes it once into the directory of an array server it starts on
demand (`lampy serve` in a subprocess, on a directory in /dev/shm where there is one) and sends
each chunk a reference; sandboxes then pull their rows in parallel, straight from that server
(sendfile). The files live for one job. References to local files are published the same way
(a sandbox cannot open the client's files), or read and pushed when they are small.

The server binds the address this machine uses to reach the platform: 127.0.0.1 for a worker
on loopback, else the outgoing interface's address. Every request to it is signed with the
shared secret, which the sandboxes already hold.

Nothing outlives the client (lampy.runtime._sweep): the server watches the client's lifeline
and, when the client dies, removes the directory and exits; the directory holds a claim while
the client lives, so starting a server first sweeps the directories of clients that are gone.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from lampy._errors import RemoteArrayError
from lampy.runtime._job import Job, SplitArray
from lampy.runtime._net import free_port, wait_ready
from lampy.runtime._sweep import claim, exit_on_sigterm, lifeline, release, sweep
from lampy.runtime.remote._npy import write
from lampy.runtime.remote._reference import RemoteArray, upload

# Chosen with bench/bench_remote.py ("publish threshold" rows, 8 chunks, `lampy worker`): at
# 1 MiB publishing is no faster than pushing (0.93x), from 4-8 MiB it wins in some runs and not
# others on the noisy 2-core machine, at 16 MiB and above it won every run (1.1x-2.6x).
PUBLISH_BYTES = 16 << 20
PREFIX = "lampy-publish-"  # the server's directory, in /dev/shm where there is one


class _Publisher:
    """One array server for this process, started on first use, stopped at exit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None
        self.host = self.url = ""

    def running(self, host: str) -> tuple[Path, str] | None:
        """The server's directory and URL if it runs on `host`."""
        with self.lock:
            alive = self.process is not None and self.process.poll() is None
            if alive and host == self.host and self.directory is not None:
                return self.directory, self.url
            return None

    def start(self, host: str) -> tuple[Path, str]:
        with self.lock:
            if self.process is not None and self.process.poll() is None and host == self.host:
                assert self.directory is not None
                return self.directory, self.url
            self.stop()
            exit_on_sigterm()
            parent = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            sweep(os.path.join(parent, f"{PREFIX}*-*"))  # claimed ones: PID-random
            self.directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
            claim(self.directory)
            port = free_port(host)
            self.host, self.url = host, f"http://{host}:{port}"
            fd = lifeline()
            command = [sys.executable, "-m", "lampy.runtime._sweep", str(fd)]
            command += ["--remove", str(self.directory), "--", "serve", str(self.directory)]
            command += ["--host", host, "--port", str(port)]
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, pass_fds=(fd,))
            try:
                wait_ready(self.url, self.process)
            except RuntimeError:
                self.stop()
                raise RemoteArrayError(
                    f"the array server for publishing large arguments did not start on {host}"
                ) from None
            return self.directory, self.url

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            release(self.directory)
            self.directory = None


_publisher = _Publisher()
atexit.register(_publisher.stop)


@contextmanager
def published(job: Job, platform_url: str, store: str = "", keep: bool = False) -> Iterator[Job]:
    """`job` with its large split arrays sent by reference; their files removed afterwards
    unless `keep` (a detached job outlives this call: they go with their server).

    With `store` (the URL of a `lampy serve` of its own), arrays are uploaded there instead of
    written to this process's server, so they outlive this process. Local-file references are
    published too, or read and pushed when small; references to array servers are left as
    they are.
    """
    todo = [i for i, a in enumerate(job.split) if _local_bytes(a) > PUBLISH_BYTES]
    host = _reachable_host(platform_url) if todo and not store else None
    split = [_read_local(a) for a in job.split]
    files: list[Path] = []
    try:
        if todo and store:
            for i in todo:
                name = f"published/{job.id}/{uuid.uuid4().hex}.npy"  # the job's: see _jobs
                split[i] = upload(f"{store.rstrip('/')}/{name}", np.asarray(split[i]))
        elif host is not None:
            directory, url = _publisher.start(host)
            for i in todo:
                array = np.asarray(split[i])
                name = f"{uuid.uuid4().hex}.npy"
                files.append(directory / name)
                meta = write(directory / name, [array])
                split[i] = RemoteArray(f"{url}/{name}", meta, 0, meta.shape[0])
        changed = any(a is not b for a, b in zip(split, job.split, strict=True))
        yield replace(job, split=tuple(split)) if changed else job
    finally:
        for path in [] if keep else files:
            path.unlink(missing_ok=True)


def serving(platform_url: str, start: bool) -> tuple[Path, str] | None:
    """This process's array server (directory, URL) on the address the platform reaches, if
    it runs; started first when `start`. None when the route from the platform is unknown."""
    if not start and _publisher.process is None:
        return None  # nothing to look up
    host = _reachable_host(platform_url)
    if host is None:
        return None
    return _publisher.running(host) or (_publisher.start(host) if start else None)


def _local_bytes(array: SplitArray) -> int:
    """Bytes the client would push for this argument (0 for a reference to a server)."""
    if isinstance(array, RemoteArray):
        return array.nbytes if array.url.startswith("file:") else 0
    return array.nbytes


def _read_local(array: SplitArray) -> SplitArray:
    """A local-file reference as a mapped array (sandboxes cannot open the client's files)."""
    if isinstance(array, RemoteArray) and array.url.startswith("file:"):
        return array.fetch()
    return array


def _reachable_host(platform_url: str) -> str | None:
    """The address of this machine that the platform reaches it by; None if unknown."""
    host = urllib.parse.urlsplit(platform_url).hostname or "127.0.0.1"
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)}
        if all(ipaddress.ip_address(a).is_loopback for a in addresses):
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((next(iter(addresses)), 9))  # no packet is sent: picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return None  # no route known: push the bytes instead
