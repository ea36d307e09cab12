"""`python -m examples.fisher diarize|generate|evaluate ...`: see the package docstring.

Mistakes are answered in one line on stderr, never a traceback: exit status 2 when the command
line or an input file is wrong (a missing or malformed wav or RTTM, a recording too short to
diarize), 1 when the work fails (the platform, a file that cannot be written, missing tools).
`--debug` or LAMPY_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import lampy

from .audio import AudioError, read_wav, trim_wav
from .devset import CONDITIONS, SPLITS
from .evaluate import evaluate
from .pipeline import DiarizationError, Params, Result, diarize
from .plot import save_timeline
from .rttm import RttmError, Turn, format_rttm, read_rttm
from .scoring import Score, ScoreError, implausible, score
from .synth import VOICES, SynthError, generate

EXECUTORS = ("inline", "local", "openlambda", "dask")
OPENLAMBDA_URL = "http://127.0.0.1:5000"  # lampy's default for the openlambda executor
MIN_SECONDS = 2.0  # shortest recording diarize reads (two 1 s mid-term windows)
# --compare-inline first runs this much of the recording untimed: imports, FFT plans and the
# allocator's first pages would otherwise be billed to whichever timed run comes first.
WARM_UP_SECONDS = 5.0
SECONDS_PER_SPEAKER = 2.0  # --speakers N needs N times this much audio: see _check_speakers
REFERENCE_SLACK = 1.0  # seconds a reference may run past the end of its recording


class Usage(Exception):
    """The command line or an input file is wrong: one line, exit status 2."""


class Failure(Exception):
    """The work could not be done: one line, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the message and where help is), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type for integers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _seconds(low: float) -> Callable[[str], float]:
    """An argparse type for a duration of at least `low` seconds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low:g} s, got {text}")
        return value

    return parse


def _conditions(text: str) -> tuple[str, ...]:
    """An argparse type for a comma-separated list of the development set's conditions."""
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CONDITIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown condition(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(CONDITIONS)}"
        )
    return chosen


def _chunks(text: str) -> int | str:
    return "auto" if text == "auto" else _count(1)(text)


def _parser() -> Parser:
    parser = Parser(
        prog="python -m examples.fisher",
        description="Speaker diarization with Fisher Linear Semi-Discriminant analysis on lampy.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks (or LAMPY_DEBUG=1)")
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_options = Parser(add_help=False)
    run_options.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="where lampy runs the heavy stages: inline (this process), local (worker "
        "processes, the default), openlambda (a worker at --url), dask (a scheduler at --url)",
    )
    run_options.add_argument(
        "--chunks",
        type=_chunks,
        help="chunks per lampy region: a number, or auto (the default: fan out only when it pays)",
    )
    run_options.add_argument(
        "--url",
        help="openlambda: the worker (default LAMPY_OPENLAMBDA_URL or "
        f"{OPENLAMBDA_URL}); dask: the scheduler address",
    )
    max_k = Params().max_speakers
    d = sub.add_parser(
        "diarize", help="find who spoke when in a wav file", parents=[common, run_options]
    )
    d.add_argument("wav", type=Path)
    d.add_argument(
        "--speakers",
        type=_count(1),
        help=f"number of speakers (default: found, 1..{max_k}, with a confidence)",
    )
    d.add_argument("--reference", type=Path, help="reference RTTM: print DER and purities")
    d.add_argument("--out", type=Path, help="directory for the RTTM and the PNG timeline")
    d.add_argument("--seed", type=_count(0), default=0, help="k-means seed (default 0)")
    d.add_argument(
        "--compare-inline",
        action="store_true",
        help="run again on the inline executor and print both times",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    g = sub.add_parser(
        "generate", help="synthesize a conversation with espeak-ng and sox", parents=[common]
    )
    g.add_argument("wav", type=Path, help="the .wav file to write")
    g.add_argument("--rttm", type=Path, help="ground truth path (default: FILE.rttm)")
    g.add_argument("--speakers", type=_count(1, len(VOICES)), default=2, help="default 2")
    g.add_argument(
        "--seconds", type=_seconds(MIN_SECONDS), default=40.0, help="length (default 40)"
    )
    g.add_argument("--seed", type=_count(0), default=0, help="default 0")
    e = sub.add_parser(
        "evaluate",
        help="DER and speaker count on the development set (docs/evaluation.md)",
        parents=[common, run_options],
    )
    e.add_argument(
        "--split", choices=SPLITS, default="tune", help="tune on tune, report on report (tune)"
    )
    e.add_argument("--per-count", type=_count(1), default=5, help="conversations per count (5)")
    e.add_argument(
        "--conditions",
        type=_conditions,
        default=CONDITIONS,
        help=f"comma-separated, from {','.join(CONDITIONS)} (default: all)",
    )
    e.add_argument("--kmeans-seeds", type=_count(1), default=3, help="per conversation (3)")
    e.add_argument(
        "--minutes",
        type=_count(1),
        default=0,
        help="long conversations of this many minutes instead of the set's 1-3",
    )
    e.add_argument("--known", action="store_true", help="give the true number of speakers")
    e.add_argument("--peer", type=Path, help="a python with pyAudioAnalysis: score it instead")
    return parser


# --- where the work runs, and what the executor did ------------------------------------------


class Observed(NamedTuple):
    """What an executor did during a run: said for a person, and whether all of the work
    stayed in this process (then a timing against inline compares the same code twice)."""

    text: str
    stayed_here: bool = False


@dataclass
class ExecutorChoice:
    """The executor a command runs on, its options, and a way to see what it did."""

    name: str
    chunks: int | str | None
    options: dict[str, Any]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExecutorChoice:
        """Resolve the executor as lampy will (flag, then LAMPY_EXECUTOR, then local).

        An openlambda worker that does not answer is an error here, before any work: the
        alternative, discovering it only when a stage fans out, would let a run that never
        fans out "succeed" without the platform it asked for.
        """
        name = args.executor or os.environ.get("LAMPY_EXECUTOR") or "local"
        options: dict[str, Any] = {}
        if name == "openlambda":
            url = (args.url or os.environ.get("LAMPY_OPENLAMBDA_URL") or OPENLAMBDA_URL).rstrip("/")
            _check_openlambda(url)
            options["url"] = url
        elif name == "dask" and args.url:
            options["address"] = args.url
        elif args.url:
            raise Usage(f"--url is for --executor openlambda or dask, not {name}")
        return cls(name, args.chunks, options)

    @contextmanager
    def using(self) -> Iterator[None]:
        """Run the block on this executor (a `lampy.using` block)."""
        chunks = None if self.chunks in (None, "auto") else int(self.chunks)
        with lampy.using(executor=self.name, chunks=chunks, **self.options):
            yield

    def observe(self) -> Callable[[], Observed]:
        """Start watching the executor; the returned function says what it did meanwhile."""
        if self.name == "local":
            before, caller = _children_cpu(), time.process_time()

            def local() -> Observed:
                after = _children_cpu()
                if after is None or before is None:
                    return Observed("local (fan-out not observable on this system)")
                workers, cpu = after[0], after[1] - before[1]
                here = f"this process {time.process_time() - caller:.2f} s"
                if not before[0] and workers:
                    return Observed(
                        f"local: started {workers} worker processes in the background, which "
                        f"did {cpu:.2f} s of CPU work, their start-up included ({here}); "
                        f"chunks={self.chunks or 'auto'}"
                    )
                if cpu < 0.01:  # the resolution of /proc's CPU times
                    return Observed(f"local: did not fan out ({_why_not(self.chunks)})", True)
                return Observed(
                    f"local: fanned out to {workers} worker processes, which did {cpu:.2f} s "
                    f"of CPU work ({here}); chunks={self.chunks or 'auto'}"
                )

            return local
        if self.name == "openlambda":
            url = self.options["url"]
            calls = _openlambda_requests(url)

            def openlambda() -> Observed:
                after = _openlambda_requests(url)
                if after is None or calls is None:
                    return Observed(f"openlambda at {url} (its /stats does not count calls)")
                if after == calls:
                    why = _why_not(self.chunks)
                    return Observed(f"openlambda at {url}: sent no calls ({why})", True)
                return Observed(
                    f"openlambda at {url}: fanned out in {after - calls} calls; "
                    f"chunks={self.chunks or 'auto'}"
                )

            return openlambda
        if self.name == "inline":
            text = "inline: every chunk in this process, one after another (no fan-out)"
            return lambda: Observed(text, True)
        return lambda: Observed(f"{self.name} (fan-out is not observed for this executor)")


def _why_not(chunks: int | str | None) -> str:
    if chunks in (None, "auto"):
        return 'chunks="auto" judged that no stage would gain; --chunks N forces a fan-out'
    return "no stage had enough rows to split"


def _children_cpu() -> tuple[int, float] | None:
    """(child processes of this one, their CPU seconds so far) from /proc; None elsewhere.

    The local executor's workers are this process's children, so their CPU time shows whether
    and how much work left the process without looking inside lampy.
    """
    tasks = Path(f"/proc/{os.getpid()}/task")
    try:
        children = {
            pid for task in tasks.iterdir() for pid in (task / "children").read_text().split()
        }
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = 0.0
    for pid in children:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        seconds += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return len(children), seconds


def _check_openlambda(url: str) -> None:
    """Fail unless an OpenLambda worker answers at `url` (GET /status: ready)."""
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as answer:
            ready = answer.read(64).strip() == b"ready"
    except urllib.error.HTTPError as exc:
        exc.close()
        ready = False
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise Failure(
            f"no OpenLambda worker answers at {url} ({reason}): start one (`lampy worker`, then "
            f"`lampy deploy --url {url}`), give --url, or choose another --executor"
        ) from None
    if not ready:
        raise Failure(f"{url} is not an OpenLambda worker (GET /status did not answer ready)")


def _openlambda_requests(url: str) -> int | None:
    """The worker's count of calls served (`requests` in GET /stats), None if it has no /stats.

    `lampy worker` lists a counter only once it is above zero, so a missing one counts as 0.
    """
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as answer:
            stats = json.load(answer)
    except (OSError, ValueError):
        return None
    count = stats.get("requests", 0) if isinstance(stats, dict) else None
    return count if isinstance(count, int) else None


# --- diarize -------------------------------------------------------------------------------


def _read_reference(path: Path, wav: Path, seconds: float) -> list[Turn]:
    """The reference turns of this recording, refusing one that cannot be its reference."""
    turns = read_rttm(path, file_id=wav.stem)
    if not turns:
        raise Usage(f"{path}: no SPEAKER lines, so nothing to score against")
    end = max(t.end for t in turns)
    if end > seconds + REFERENCE_SLACK:
        raise Usage(
            f"{path}: turns run to {end:.1f} s but {wav} lasts {seconds:.1f} s; "
            "is it the reference of this recording?"
        )
    return turns


def _check_speakers(wanted: int | None, seconds: float, wav: Path) -> None:
    """Refuse a speaker count the recording cannot hold.

    A speaker becomes a cluster of 1 s mid-term windows; two seconds of audio per speaker is
    the least that leaves each cluster more than one window, before any silence.
    """
    most = int(seconds // SECONDS_PER_SPEAKER)
    if wanted is not None and wanted > most:
        raise Usage(
            f"--speakers {wanted}: {wav} lasts {seconds:.1f} s, room for at most {most} "
            f"speakers ({SECONDS_PER_SPEAKER:g} s of audio each)"
        )


def _count_line(result: Result) -> str:
    """The speaker count and how sure it is: found with a confidence, given, or cannot tell."""
    count = result.count
    if not count.known:
        return f"speakers: cannot tell ({count.note})" if count.note else "speakers: cannot tell"
    if not count.scores:  # given with --speakers
        return f"speakers: {result.n_speakers} (given)"
    note = f"; {count.note}" if count.note else ""
    return f"speakers: {result.n_speakers} (confidence {count.confidence:.2f}{note})"


def _count_warning(result: Result, wav: Path) -> str | None:
    """A warning naming the file when the count could not be found (too little speech)."""
    if not result.count.known:
        why = result.count.note or "too little speech"
        return f"{wav}: cannot tell how many speakers there are: {why}"
    return None


def _table(result: Result, scored: Score | None, total: float) -> str:
    lines = [f"{'start':>9} {'end':>9} {'dur':>7}  speaker"]
    for t in result.turns:
        lines.append(f"{t.start:9.2f} {t.end:9.2f} {t.duration:7.2f}  {t.speaker}")
    lines.append(f"\n{_count_line(result)}")
    if scored:
        lines += [
            f"DER (no collar): {100 * scored.der:.2f}%  (missed {100 * scored.missed:.2f}%, "
            f"false alarm {100 * scored.false_alarm:.2f}%, "
            f"confusion {100 * scored.confusion:.2f}%)",
            f"DER (0.25 s collar): {100 * scored.der_collar:.2f}%",
            f"cluster purity: {100 * scored.cluster_purity:.1f}%  "
            f"speaker purity: {100 * scored.speaker_purity:.1f}%",
        ]
    lines.append("\ntime per stage:")
    lines += [f"  {stage:<10} {sec * 1000:8.1f} ms" for stage, sec in result.timings.items()]
    lines.append(f"  {'total':<10} {total * 1000:8.1f} ms")
    return "\n".join(lines)


def _out_dir(path: Path) -> Path:
    """The --out directory, made if needed; refused when it names a file."""
    if path.exists() and not path.is_dir():
        raise Usage(f"--out {path} is a file; --out names a directory for the RTTM and PNG")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Failure(f"cannot make --out {path}: {exc.strerror}") from None
    return path


def _plot_title(wav: Path, result: Result, scored: Score | None) -> str:
    plural = "" if result.n_speakers == 1 else "s"
    title = f"{wav.name}: {result.n_speakers} speaker{plural} found"
    if scored is not None:
        title += (
            f"; DER {100 * scored.der:.1f}% (with 0.25 s collar {100 * scored.der_collar:.1f}%)"
        )
    return title


def _diarize(args: argparse.Namespace) -> int:
    signal, rate = read_wav(args.wav, min_seconds=MIN_SECONDS)
    seconds = signal.size / rate
    _check_speakers(args.speakers, seconds, args.wav)
    reference = _read_reference(args.reference, args.wav, seconds) if args.reference else None
    out = _out_dir(args.out) if args.out else None  # before the run: fail before the work
    executor = ExecutorChoice.from_args(args)
    # The local pool is not started here: chunks="auto" starts it in the background when a
    # stage would gain from it, and runs in this process meanwhile, so a short recording never
    # waits for workers it does not need.
    if args.compare_inline:  # neither timed run pays the first run's one-time costs alone
        with lampy.using(executor="inline"), contextlib.suppress(Exception):
            diarize(signal[: int(WARM_UP_SECONDS * rate)], rate, None, args.seed)
    done = executor.observe()
    start = time.perf_counter()
    with executor.using(), _names(args.wav):
        result = diarize(signal, rate, args.speakers, args.seed)
    total = time.perf_counter() - start
    fan_out = done()
    inline_total = None
    if args.compare_inline:
        start = time.perf_counter()
        with lampy.using(executor="inline"), _names(args.wav):
            again = diarize(signal, rate, args.speakers, args.seed)
        inline_total = time.perf_counter() - start
        if again.turns != result.turns:
            _warn("the inline run found other turns (float sums in another order)")
    scored = score(reference, result.turns) if reference is not None else None
    for warning in (_count_warning(result, args.wav), implausible(scored) if scored else None):
        if warning:
            _warn(warning)
    written = _write_outputs(out, args.wav, result, reference, scored) if out else {}
    if args.json:
        report: dict[str, Any] = {
            "file": str(args.wav),
            "speakers": result.n_speakers,
            "count": asdict(result.count),
            "turns": [asdict(t) for t in result.turns],
            "timings": {**result.timings, "total": total},
            "executor": executor.name,
            "fan_out": fan_out.text,
            "written": written,
        }
        if inline_total is not None:
            report["inline_total"] = inline_total
        if scored:
            report["score"] = asdict(scored)
        print(json.dumps(report, indent=2))
        return 0
    print(_table(result, scored, total))
    print(f"\nexecutor: {fan_out.text}")
    if inline_total is not None:
        print(_comparison(executor.name, total, inline_total, fan_out.stayed_here))
    for kind, path in written.items():
        print(f"wrote {kind.upper()}: {path}")
    return 0


def _write_outputs(
    out: Path, wav: Path, result: Result, reference: list[Turn] | None, scored: Score | None
) -> dict[str, str]:
    """Write NAME.rttm and NAME.png into `out`; the paths written, by kind."""
    rttm = out / f"{wav.stem}.rttm"
    rttm.write_text(format_rttm(result.turns, wav.stem))
    png = out / f"{wav.stem}.png"
    mapping = scored.mapping if scored else None
    note = save_timeline(png, result.turns, reference, mapping, _plot_title(wav, result, scored))
    if note:  # no matplotlib: the RTTM alone
        _warn(note)
        return {"rttm": str(rttm)}
    return {"rttm": str(rttm), "png": str(png)}


# Two runs of the same code in one process differ by up to this much here (the second finds
# warm caches and allocator): a smaller gap is no verdict either way.
SAME_RUN_SPREAD = 1.15


def _comparison(name: str, total: float, inline_total: float, stayed_here: bool) -> str:
    ratio = inline_total / total
    if stayed_here:  # both runs were the same code in this process: a gap is noise
        return (
            f"time: {name} {total:.2f} s against inline {inline_total:.2f} s for the same run: "
            "the same code ran in this process both times (nothing fanned out)"
        )
    if 1 / SAME_RUN_SPREAD < ratio < SAME_RUN_SPREAD:
        verdict = f"about as fast (within {SAME_RUN_SPREAD - 1:.0%}, two runs' usual spread)"
    elif ratio >= 1:
        verdict = f"{ratio:.2f}x faster"
    else:
        verdict = f"{1 / ratio:.2f}x slower"
    return (
        f"time: {name} {total:.2f} s against inline {inline_total:.2f} s for the same run: "
        f"{name} is {verdict}"
    )


@contextmanager
def _names(wav: Path) -> Iterator[None]:
    """Errors of the pipeline about the recording name the recording."""
    try:
        yield
    except DiarizationError as exc:
        raise Usage(f"{wav}: {exc}") from None


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


# --- generate and evaluate -----------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    wav: Path = args.wav
    rttm: Path = args.rttm or wav.with_suffix(".rttm")
    if wav.suffix.lower() != ".wav":
        raise Usage(f"{wav}: generate writes WAV audio only; name the file .wav")
    for path in (wav, rttm):
        if not path.parent.is_dir():
            raise Failure(f"cannot write {path}: no directory {path.parent}")
    # Write beside the targets, then rename: a failure leaves no half-made files behind.
    with tempfile.TemporaryDirectory(dir=wav.parent, prefix=".generate-") as tmp:
        tmp_wav, tmp_rttm = Path(tmp) / "conversation.wav", Path(tmp) / "conversation.rttm"
        turns = generate(tmp_wav, tmp_rttm, args.speakers, args.seconds, args.seed)
        # The generator ends on a whole turn, past the length asked for: cut it there.
        length = trim_wav(tmp_wav, args.seconds)
        turns = [Turn(t.start, min(t.end, length), t.speaker) for t in turns if t.start < length]
        heard = {t.speaker for t in turns}
        if len(heard) < args.speakers:
            raise Usage(
                f"--seconds {args.seconds:g} is too short for {args.speakers} speakers to each "
                f"take a turn ({len(heard)} did); ask for more seconds or another --seed"
            )
        tmp_rttm.write_text(format_rttm(turns, wav.stem))
        shutil.move(tmp_wav, wav)
        shutil.move(tmp_rttm, rttm)
    print(f"wrote {wav} ({length:.1f} s, {len(heard)} speakers, {len(turns)} turns) and {rttm}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    executor = ExecutorChoice.from_args(args)
    with executor.using():
        report = evaluate(
            args.split,
            args.per_count,
            args.conditions,
            args.kmeans_seeds,
            args.known,
            args.peer,
            args.minutes,
        )
    print(report)
    return 0


COMMANDS = {"diarize": _diarize, "generate": _generate, "evaluate": _evaluate}
INPUT_ERRORS = (Usage, AudioError, RttmError, ScoreError, lampy.OptionError)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    prog = f"python -m examples.fisher {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug or os.environ.get("LAMPY_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"{prog}: {_message(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, INPUT_ERRORS) else 1


def _message(error: Exception) -> str:
    """One line for any error: its first line, and for unexpected ones the way to learn more."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(error, (*INPUT_ERRORS, Failure, SynthError)):
        return first
    if isinstance(error, lampy.LampyError):
        return f"lampy failed: {first}"
    if isinstance(error, OSError) and not isinstance(error, ModuleNotFoundError):
        return f"{first or type(error).__name__}"
    # A chunk's own exception comes back with its type and a note naming the chunk.
    chunk = [n for n in getattr(error, "__notes__", []) if n.startswith("raised in lampy")]
    where = f", {chunk[0]}" if chunk else ""
    if chunk and isinstance(error, ModuleNotFoundError):
        where += " (the workers cannot import it)"
    return f"{type(error).__name__}: {first}{where} (--debug shows the traceback)"
