"""Coverage-guided fuzzing of the frame decoder with atheris (a manual run, not in make test).

    pip install atheris
    python -m tests.runtime.openlambda.fuzz_frames -runs=500000

Every input must be refused with a FrameError (or decode, which the HMAC makes practically
impossible without the key); anything else, or reaching `loads`, is a crash atheris reports.
"""

from __future__ import annotations

import contextlib
import sys

from lampy._errors import FrameError
from lampy.runtime.openlambda import _frames as frames

KEY = b"fuzz-secret"


class Unpickled(BaseException):
    """An unsigned frame reached `loads`: the one thing that must never happen."""


def tripwire(*args: object) -> None:
    raise Unpickled


def one_input(data: bytes) -> None:
    """Both decoding paths: a whole buffer, and a Reader fed as an answer streams in."""
    with contextlib.suppress(FrameError):
        frames.decode(bytearray(data), KEY)
    with contextlib.suppress(FrameError):
        reader = frames.Reader(data[: frames.HEAD_BYTES], KEY, max_bytes=len(data))
        reader.feed(data[frames.PREFIX_BYTES :])
        reader.frame()


def main() -> None:
    import atheris  # type: ignore[import-not-found]

    frames.loads = tripwire  # type: ignore[assignment]
    atheris.Setup(sys.argv, one_input)
    atheris.instrument_func(frames.check_head)
    atheris.instrument_func(frames.decode)
    atheris.instrument_func(frames._load)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
