"""`python -m examples.fisher diarize|generate|evaluate ...`: see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import lampy

from .audio import AudioError, read_wav
from .devset import CONDITIONS, SPLITS
from .evaluate import evaluate
from .pipeline import DiarizationError, Result, diarize
from .plot import save_timeline
from .rttm import RttmError, format_rttm, read_rttm
from .scoring import Score, score
from .synth import SynthError, generate

MIN_SECONDS = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fisher",
        description="Speaker diarization with Fisher Linear Semi-Discriminant analysis on lampy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diarize", help="find who spoke when in a wav file")
    d.add_argument("wav", type=Path)
    d.add_argument("--speakers", type=int, help="number of speakers (default: found, 1..8)")
    d.add_argument("--reference", type=Path, help="reference RTTM: print DER and purities")
    d.add_argument("--executor", default=None, help="lampy executor: inline, local, openlambda")
    d.add_argument("--out", type=Path, help="directory for the RTTM and the PNG timeline")
    d.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    g = sub.add_parser("generate", help="synthesize a conversation with espeak-ng and sox")
    g.add_argument("wav", type=Path)
    g.add_argument("--rttm", type=Path, help="ground truth path (default: FILE.rttm)")
    g.add_argument("--speakers", type=int, default=2)
    g.add_argument("--seconds", type=float, default=40.0)
    g.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="DER and speaker count on the development set")
    e.add_argument("--split", choices=SPLITS, default="tune", help="tune on tune, report report")
    e.add_argument("--per-count", type=int, default=5, help="conversations per speaker count")
    e.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated")
    e.add_argument("--kmeans-seeds", type=int, default=3)
    e.add_argument("--known", action="store_true", help="give the true number of speakers")
    e.add_argument("--peer", type=Path, help="python with pyAudioAnalysis: score it instead")
    e.add_argument("--executor", default=None, help="lampy executor: inline, local, openlambda")
    return parser


def _table(result: Result, scored: Score | None, total: float) -> str:
    lines = [f"{'start':>9} {'end':>9} {'dur':>7}  speaker"]
    for t in result.turns:
        lines.append(f"{t.start:9.2f} {t.end:9.2f} {t.duration:7.2f}  {t.speaker}")
    c = result.count
    found = f"{result.n_speakers} (confidence {c.confidence:.2f})" if c.known else "cannot tell"
    lines.append(f"\nspeakers: {found}" + (f" ({c.note})" if c.note else ""))
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


def _diarize(args: argparse.Namespace) -> int:
    signal, rate = read_wav(args.wav, min_seconds=MIN_SECONDS)
    reference = read_rttm(args.reference) if args.reference else None
    start = time.perf_counter()
    with lampy.using(executor=args.executor) if args.executor else nullcontext():
        result = diarize(signal, rate, args.speakers, args.seed)
    total = time.perf_counter() - start
    scored = score(reference, result.turns) if reference is not None else None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        rttm_path = args.out / f"{args.wav.stem}.rttm"
        rttm_path.write_text(format_rttm(result.turns, args.wav.stem))
        mapping = scored.mapping if scored else None
        png = args.out / f"{args.wav.stem}.png"
        note = save_timeline(png, result.turns, reference, mapping)
        if note and not args.json:
            print(note, file=sys.stderr)
    if args.json:
        out = {
            "file": str(args.wav),
            "speakers": result.n_speakers,
            "count": asdict(result.count),
            "turns": [asdict(t) for t in result.turns],
            "timings": {**result.timings, "total": total},
        }
        if scored:
            out["score"] = asdict(scored)
        print(json.dumps(out, indent=2))
    else:
        print(_table(result, scored, total))
    return 0


def _generate(args: argparse.Namespace) -> int:
    rttm = args.rttm or args.wav.with_suffix(".rttm")
    turns = generate(args.wav, rttm, args.speakers, args.seconds, args.seed)
    print(f"wrote {args.wav} and {rttm}: {len(turns)} turns, {turns[-1].end:.1f} s")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    with lampy.using(executor=args.executor) if args.executor else nullcontext():
        conditions = tuple(args.conditions.split(","))
        print(
            evaluate(
                args.split, args.per_count, conditions, args.kmeans_seeds, args.known, args.peer
            )
        )
    return 0


COMMANDS = {"diarize": _diarize, "generate": _generate, "evaluate": _evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (
        AudioError,
        RttmError,
        DiarizationError,
        SynthError,
        lampy.UnknownExecutorError,
        lampy.OptionError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
