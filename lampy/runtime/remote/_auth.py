"""Signing array-server requests with the shared secret (the one that signs lampy's frames).

A request carries `X-Lampy-Time` (Unix seconds) and `X-Lampy-Signature`, the HMAC-SHA256 of
its method, target (path and query, as sent), Range and Content-Length headers and that time.
The server accepts a signature within `WINDOW_S` of its own clock. Like S3's unsigned
payloads, an upload's bytes are not hashed (that would cost a full pass over gigabytes): the
signature binds the request to its length, path and time, not to its content.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

WINDOW_S = 300.0  # clock skew and replay window
TIME_HEADER = "X-Lampy-Time"
SIGNATURE_HEADER = "X-Lampy-Signature"


def signature(secret: bytes, method: str, target: str, range_: str, length: str, when: str) -> str:
    """The hex tag of one request.

    >>> signature(b"k", "GET", "/x.npy", "bytes=0-7", "", "1700000000")[:16]
    'b90610c8187d19b1'
    """
    message = "\n".join((method.upper(), target, range_, length, when)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    secret: bytes, method: str, target: str, range_: str = "", length: str = ""
) -> dict[str, str]:
    """The headers that authenticate a request (add Range / Content-Length as signed)."""
    when = str(int(time.time()))
    tag = signature(secret, method, target, range_, length, when)
    return {TIME_HEADER: when, SIGNATURE_HEADER: tag}


def check(secret: bytes, method: str, target: str, headers: Mapping[str, str]) -> str | None:
    """None when the request is signed with `secret` and recent; else why it is refused."""
    when, tag = headers.get(TIME_HEADER, ""), headers.get(SIGNATURE_HEADER, "")
    if not when or not tag:
        return (
            f"unsigned request: {TIME_HEADER} and {SIGNATURE_HEADER} headers are required "
            "(lampy.remote signs with LAMPY_SECRET)"
        )
    try:
        skew = abs(time.time() - float(when))
    except ValueError:
        return f"bad {TIME_HEADER} header {when!r}"
    if skew > WINDOW_S:
        return f"signature is {skew:.0f} s from the server's clock (window {WINDOW_S:g} s)"
    expected = signature(
        secret,
        method,
        target,
        headers.get("Range", ""),
        headers.get("Content-Length", ""),
        when,
    )
    if not hmac.compare_digest(expected, tag):
        return (
            "signature does not match: client and server use different LAMPY_SECRET values "
            "(or the request was altered)"
        )
    return None
