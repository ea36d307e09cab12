"""Seeded, byte-reproducible synthetic conversations from espeak-ng and sox, with RTTM truth.

Each turn is synthesized with its speaker's voice, pitch and speed, resampled by `sox -D` (no
dither, so the bytes repeat), trimmed of leading and trailing silence, and joined with short gaps
over a seeded low noise floor. Turn boundaries are exact, so the RTTM is the ground truth.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import read_wav, write_wav
from .rttm import Turn, format_rttm

INSTALL_HINT = "install espeak-ng and sox: apt-get install -y espeak-ng sox"


class SynthError(RuntimeError):
    """The conversation cannot be generated: missing tools or impossible settings."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice (language plus variant), its pitch (0-99) and speed (words per minute)."""

    name: str
    pitch: int
    speed: int


VOICES: tuple[Voice, ...] = (
    Voice("en-us+m3", 20, 140),
    Voice("en+f5", 85, 185),
    Voice("en-gb-scotland+m7", 50, 160),
    Voice("en-us+f2", 65, 150),
)

_WORDS = {
    "subject": (
        "the farmer",
        "my neighbour",
        "our teacher",
        "the old captain",
        "a young doctor",
        "the baker",
        "your sister",
        "the engineer",
        "a quiet student",
        "the mayor",
        "my uncle",
        "the pilot",
    ),
    "verb": (
        "painted",
        "carried",
        "repaired",
        "discovered",
        "sold",
        "borrowed",
        "cleaned",
        "described",
        "opened",
        "measured",
        "ordered",
        "photographed",
    ),
    "object": (
        "a red bicycle",
        "the wooden boat",
        "three baskets of apples",
        "an enormous map",
        "the kitchen window",
        "a broken clock",
        "the garden fence",
        "two silver spoons",
        "a heavy suitcase",
        "the library roof",
        "a bag of flour",
        "the village bell",
    ),
    "tail": (
        "before lunch",
        "on a rainy morning",
        "after the long meeting",
        "near the river",
        "with great care",
        "in the middle of winter",
        "for the summer festival",
        "without saying a word",
        "late at night",
        "beside the station",
    ),
}
_OPENERS = (
    "well",
    "you know",
    "honestly",
    "and then",
    "actually",
    "by the way",
    "so",
    "right",
)
_REPLIES = (
    "Yes, I agree with that.",
    "Really? I did not know that.",
    "Oh, that is very interesting.",
    "No, not at all.",
    "Hmm, maybe you are right.",
    "Exactly, that is what I meant.",
)


def have_tools() -> bool:
    """Whether espeak-ng and sox are on the PATH."""
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def sentence(rng: np.random.Generator) -> str:
    """One random sentence from the word lists."""
    parts = [_WORDS[key][rng.integers(len(_WORDS[key]))] for key in _WORDS]
    opener = _OPENERS[rng.integers(len(_OPENERS))] + ", " if rng.random() < 0.4 else ""
    text = opener + " ".join(parts)
    return text[0].upper() + text[1:] + "."


def speak(voice: Voice, text: str, rate: int, workdir: Path, index: int) -> np.ndarray:
    """Speak `text` with `voice`, resample to `rate` with sox (no dither), trim silence."""
    raw, out = workdir / f"{index}.raw.wav", workdir / f"{index}.wav"
    cmd = ["espeak-ng", "-v", voice.name, "-p", str(voice.pitch), "-s", str(voice.speed)]
    subprocess.run([*cmd, "-w", str(raw), text], check=True, capture_output=True)
    sox = ["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(out)]
    subprocess.run(sox, check=True, capture_output=True)
    samples, _ = read_wav(out)
    loud = np.flatnonzero(np.abs(samples) > 0.02 * np.abs(samples).max())
    return samples[loud[0] : loud[-1] + 1] if loud.size else samples


def generate(
    wav_path: str | Path,
    rttm_path: str | Path,
    n_speakers: int = 2,
    seconds: float = 40.0,
    seed: int = 0,
    rate: int = 16000,
) -> list[Turn]:
    """Write a conversation of about `seconds` between `n_speakers` voices and its RTTM."""
    if not 1 <= n_speakers <= len(VOICES):
        raise SynthError(f"n_speakers must be 1..{len(VOICES)}, got {n_speakers}")
    if not have_tools():
        raise SynthError(INSTALL_HINT)
    rng = np.random.default_rng(seed)
    # Plan more script than needed (a sentence lasts 3-5 s, a reply about 1.5 s); cut when joining.
    script: list[tuple[int, str]] = []
    # The first turns go to every speaker once, in a random order, so all of them are heard.
    opening = [int(s) for s in rng.permutation(n_speakers)]
    planned, speaker = 0.0, -1
    while planned < 1.5 * seconds + 5.0:
        choices = [s for s in range(n_speakers) if s != speaker] or [0]
        speaker = opening.pop(0) if opening else int(rng.choice(choices))
        if rng.random() < 0.25:
            script.append((speaker, _REPLIES[rng.integers(len(_REPLIES))]))
            planned += 2.0
        else:
            n_sentences = int(rng.choice([1, 1, 2, 3]))
            script.append((speaker, " ".join(sentence(rng) for _ in range(n_sentences))))
            planned += n_sentences * 3.0 + 0.6
    gaps = rng.uniform(0.3, 1.0, size=len(script))
    gains = rng.uniform(0.5, 0.9, size=len(script))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(speak, VOICES[s], text, rate, Path(tmp), i)
            for i, (s, text) in enumerate(script)
        ]
        clips = [job.result() for job in jobs]
    pieces: list[np.ndarray] = [np.zeros(round(0.5 * rate), dtype=np.float32)]
    turns: list[Turn] = []
    cursor = pieces[0].size
    for (s, _), clip, gap, gain in zip(script, clips, gaps, gains, strict=True):
        if cursor / rate >= seconds:
            break
        clip = clip * (gain / max(float(np.abs(clip).max()), 1e-9))
        turns.append(Turn(round(cursor / rate, 3), round((cursor + clip.size) / rate, 3), f"S{s}"))
        pieces += [clip.astype(np.float32), np.zeros(round(gap * rate), dtype=np.float32)]
        cursor += clip.size + pieces[-1].size
    signal = np.concatenate(pieces)
    signal = signal + rng.normal(0.0, 10 ** (-55 / 20), signal.size).astype(np.float32)
    write_wav(wav_path, signal, rate)
    Path(rttm_path).write_text(format_rttm(turns, Path(wav_path).stem))
    return turns
