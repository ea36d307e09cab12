"""Signing HTTP requests with the shared secret (the one that signs lampy's frames): the array
server's (`lampy serve`) and the registry of `lampy worker`.

A request carries `X-Lampy-Time` (Unix seconds), `X-Lampy-Nonce` (random, hex) and
`X-Lampy-Signature`, the HMAC-SHA256 of its method, target (path and query, as sent), Range and
Content-Length headers, that time and nonce, and `X-Lampy-Content-SHA256` when the request
has it. The receiver accepts a signature within `WINDOW_S` of its own clock whose nonce it has
not seen (`Freshness`). Like S3's unsigned payloads, an array upload's bytes are not hashed
(that would cost a full pass over gigabytes): its signature binds the request to its length,
path and time, not to its content. A registry upload (code, and small) is hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from lampy.runtime._secret import WINDOW_S, Freshness, nonce

TIME_HEADER = "X-Lampy-Time"
NONCE_HEADER = "X-Lampy-Nonce"
DIGEST_HEADER = "X-Lampy-Content-SHA256"
SIGNATURE_HEADER = "X-Lampy-Signature"
__all__ = ["WINDOW_S", "check", "sign", "signature"]


def signature(
    secret: bytes,
    method: str,
    target: str,
    range_: str,
    length: str,
    when: str,
    nonce: str = "",
    digest: str = "",
) -> str:
    """The hex tag of one request.

    >>> signature(b"k", "GET", "/x.npy", "bytes=0-7", "", "1700000000", "ab")[:16]
    '1e6fb671284d7448'
    """
    fields = (method.upper(), target, range_, length, when, nonce, digest)
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def sign(
    secret: bytes,
    method: str,
    target: str,
    range_: str = "",
    length: str = "",
    digest: str = "",
) -> dict[str, str]:
    """The headers that authenticate a request (add Range / Content-Length as signed; a
    `digest`, the body's SHA-256 in hex, is sent and signed as X-Lampy-Content-SHA256)."""
    when, once = repr(time.time()), nonce().hex()
    tag = signature(secret, method, target, range_, length, when, once, digest)
    headers = {TIME_HEADER: when, NONCE_HEADER: once, SIGNATURE_HEADER: tag}
    return headers | ({DIGEST_HEADER: digest} if digest else {})


def check(
    secret: bytes,
    method: str,
    target: str,
    headers: Mapping[str, str],
    freshness: Freshness,
) -> str | None:
    """None when the request is signed with `secret`, recent and new; else why it is refused.

    The nonce is remembered only once the tag matches, so unsigned requests cannot fill
    the receiver's memory.
    """
    when, once = headers.get(TIME_HEADER, ""), headers.get(NONCE_HEADER, "")
    tag = headers.get(SIGNATURE_HEADER, "")
    if not when or not once or not tag:
        return (
            f"unsigned request: {TIME_HEADER}, {NONCE_HEADER} and {SIGNATURE_HEADER} headers "
            "are required (lampy signs with LAMPY_SECRET)"
        )
    try:
        seconds = float(when)
    except ValueError:
        return f"bad {TIME_HEADER} header {when!r}"
    expected = signature(
        secret,
        method,
        target,
        headers.get("Range", ""),
        headers.get("Content-Length", ""),
        when,
        once,
        headers.get(DIGEST_HEADER, ""),
    )
    if not hmac.compare_digest(expected, tag):
        return (
            "signature does not match: client and server use different LAMPY_SECRET values "
            "(or the request was altered)"
        )
    stale = freshness.check(seconds, once.encode())
    return None if stale is None else f"refused as stale: {stale}"
