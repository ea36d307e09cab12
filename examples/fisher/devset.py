"""The development set: conversations unlike the tuning data, in several recording conditions.

The bundled generator (`synth.generate`) speaks four fixed voices over one vocabulary; the
pipeline's defaults were first tuned on it, so it says nothing about voices and rooms never heard.
This set draws every speaker afresh from espeak-ng's English dialects and voice variants (the
four tuning voices left out), with its own pitch and speed, unequal talk time, short replies and
some overlapping speech, 1 to 8 speakers, and a vocabulary of its own. Each conversation is then
played through every condition: clean, pink noise at 20/10/5 dB SNR, a reverberant room (sox
`reverb`), a telephone channel (sox: 300-3400 Hz band at 8 kHz, mu-law) and level changes.

The split is fixed: `tune` and `report` use disjoint voice variants and different seeds. Tune on
`tune`; `report` is only for the figures in docs/evaluation.md.

Audio is cached under $LAMPY_FISHER_DEV_DATA (default /tmp/lampy-fisher-dev), in a folder named
after GENERATOR_VERSION and a hash of synth.py, so a changed generator never reuses stale audio.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import read_wav, write_wav
from .rttm import Turn, format_rttm, read_rttm
from .synth import INSTALL_HINT, SynthError, Voice, have_tools, speak

RATE = 16000
SPLITS = ("tune", "report")
CONDITIONS = ("clean", "snr20", "snr10", "snr5", "reverb", "telephone", "level")
MAX_SPEAKERS = 8
# Bump when anything here changes the audio or the reference (voices, script, mixing,
# degradations), so cached files of the old set are never scored as the new one.
GENERATOR_VERSION = 1

DIALECTS = (
    "en",
    "en-us",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-rp",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# espeak-ng voice variants that sound like a person (robots, whispers and effects left out), minus
# the tuning voices' m3, m7, f2 and f5. Alternate ones go to each split, so the report split's
# voices are never heard while tuning.
VARIANTS = (
    "Alex",
    "Alicia",
    "Andrea",
    "Andy",
    "Annie",
    "Denis",
    "Diogo",
    "Gene",
    "Henrique",
    "Hugo",
    "Jacky",
    "Lee",
    "Marco",
    "Mario",
    "Michael",
    "Mike",
    "adam",
    "anika",
    "antonio",
    "aunty",
    "belinda",
    "benjamin",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "f1",
    "f3",
    "f4",
    "grandma",
    "grandpa",
    "iven",
    "john",
    "linda",
    "m1",
    "m2",
    "m4",
    "m5",
    "m6",
    "m8",
    "max",
    "michel",
    "miguel",
    "norbert",
    "pablo",
    "paul",
    "quincy",
    "rob",
    "robert",
    "steph",
    "travis",
    "victor",
    "zac",
)

_PHRASES = {
    "who": (
        "the new manager",
        "my grandmother",
        "a tall fisherman",
        "the night nurse",
        "our landlord",
        "the choir director",
        "a clever lawyer",
        "the bus driver",
        "my best friend",
        "the museum guide",
        "a retired sailor",
        "the head chef",
    ),
    "did": (
        "forgot",
        "explained",
        "bought",
        "lost",
        "delivered",
        "promised",
        "tested",
        "returned",
        "planted",
        "answered",
        "shipped",
        "printed",
    ),
    "what": (
        "the quarterly report",
        "a dozen fresh eggs",
        "the parking permit",
        "an umbrella with holes",
        "the spare keys",
        "a jar of honey",
        "the concert tickets",
        "seven orange chairs",
        "the winter schedule",
        "a letter from Canada",
        "the blue notebook",
        "our travel insurance",
    ),
    "when": (
        "last Tuesday",
        "during the storm",
        "at half past nine",
        "right after breakfast",
        "on the way home",
        "before the holidays",
        "while we were waiting",
        "at the very last minute",
        "three weeks ago",
        "this afternoon",
    ),
}
_SHORT = (
    "Yes.",
    "No.",
    "Okay.",
    "Right.",
    "Sure.",
    "Mm hmm.",
    "Really?",
    "I see.",
    "Wait.",
    "Exactly.",
    "Oh no.",
    "Why?",
)


@dataclass(frozen=True)
class Conversation:
    """One development-set conversation: which split, how many speakers, its seed and length."""

    split: str
    n_speakers: int
    index: int
    seed: int
    seconds: float
    minutes: int = 0  # a long conversation of this many minutes; 0 for the set's own

    @property
    def name(self) -> str:
        length = f"-{self.minutes}min" if self.minutes else ""
        return f"{self.split}-{self.n_speakers}spk-{self.index}{length}"


def conversations(split: str, per_count: int = 5, minutes: int = 0) -> list[Conversation]:
    """The fixed list of a split: `per_count` conversations for each count 1..MAX_SPEAKERS.

    Seeds depend only on the split, the count and the index, so a larger `per_count` keeps the
    first conversations unchanged. Longer conversations for more speakers keep every speaker's
    share of talk above a few seconds. With `minutes`, every conversation is that long instead
    (other seeds, so other voices and words): the long recordings a count tuned on clips of
    1-3 minutes must also hold on.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if minutes < 0:
        raise ValueError(f"minutes must be 0 (the set's own lengths) or more, got {minutes}")
    base = 1_000_000 * (SPLITS.index(split) + 1) + (500_000 if minutes else 0)
    return [
        Conversation(split, n, i, base + 1000 * n + i, 60.0 * minutes or 45.0 + 15.0 * n, minutes)
        for n in range(1, MAX_SPEAKERS + 1)
        for i in range(per_count)
    ]


def cast(conversation: Conversation) -> list[Voice]:
    """Voices for the speakers: distinct variants of the split, pitches spread over the range.

    Pitches are drawn one per band of the 5-95 range, so no two speakers in a conversation share
    variant and pitch band (near-identical voices are near chance even with supervision).
    """
    rng = np.random.default_rng([conversation.seed, 1])
    pool = VARIANTS[SPLITS.index(conversation.split) :: 2]
    n = conversation.n_speakers
    variants = rng.choice(len(pool), n, replace=False)
    width = 90.0 / n
    pitches = 5.0 + width * (rng.permutation(n) + rng.uniform(0.15, 0.85, n))
    return [
        Voice(
            f"{DIALECTS[rng.integers(len(DIALECTS))]}+{pool[v]}",
            round(float(p)),
            int(rng.integers(125, 206)),
        )
        for v, p in zip(variants, pitches, strict=True)
    ]


def _sentence(rng: np.random.Generator) -> str:
    text = " ".join(words[rng.integers(len(words))] for words in _PHRASES.values())
    return text[0].upper() + text[1:] + "."


def _script(conversation: Conversation, rng: np.random.Generator) -> list[tuple[int, str]]:
    """Who says what: unequal talk time, every speaker heard early, about one turn in five short."""
    n = conversation.n_speakers
    share = 0.5 / n + 0.5 * rng.dirichlet(np.ones(n))
    opening = [int(s) for s in rng.permutation(n)]
    script: list[tuple[int, str]] = []
    planned, speaker = 0.0, -1
    while planned < 1.4 * conversation.seconds + 5.0:
        if opening:
            speaker = opening.pop(0)
        else:
            weights = np.where(np.arange(n) == speaker, 0.0, share) if n > 1 else share
            speaker = int(rng.choice(n, p=weights / weights.sum()))
        if rng.random() < 0.2:
            script.append((speaker, _SHORT[rng.integers(len(_SHORT))]))
            planned += 0.8
        else:
            count = int(rng.choice([1, 1, 1, 2]))
            script.append((speaker, " ".join(_sentence(rng) for _ in range(count))))
            planned += 3.0 * count + 0.5
    return script


def render(conversation: Conversation) -> tuple[np.ndarray, list[Turn]]:
    """Synthesize the clean conversation: (signal at RATE, reference turns, overlaps allowed).

    About one turn in eight starts 0.2-0.8 s before the previous one ends (both voices summed);
    the others follow after a pause of 0.15-0.9 s. Each turn has its own level within 8 dB.
    """
    if not have_tools():
        raise SynthError(INSTALL_HINT)
    rng = np.random.default_rng(conversation.seed)
    voices = cast(conversation)
    script = _script(conversation, rng)
    with tempfile.TemporaryDirectory() as tmp:
        clips = [speak(voices[s], text, RATE, Path(tmp), i) for i, (s, text) in enumerate(script)]
    length = round((conversation.seconds + 30.0) * RATE)
    signal = np.zeros(length, dtype=np.float64)
    turns: list[Turn] = []
    cursor = round(0.5 * RATE)
    previous = 0
    for (s, _), clip in zip(script, clips, strict=True):
        overlap = rng.random() < 0.125 and turns
        gap = -rng.uniform(0.2, 0.8) if overlap else rng.uniform(0.15, 0.9)
        gain = 0.5 * 10 ** (-rng.uniform(0.0, 8.0) / 20.0)
        start = max(cursor + round(gap * RATE), cursor - previous // 2)
        if start / RATE >= conversation.seconds or start + clip.size > length:
            break
        signal[start : start + clip.size] += clip * (gain / max(float(np.abs(clip).max()), 1e-9))
        turns.append(Turn(round(start / RATE, 3), round((start + clip.size) / RATE, 3), f"S{s}"))
        cursor = max(cursor, start + clip.size)
        previous = clip.size
    signal = signal[: cursor + round(0.5 * RATE)]
    signal += rng.normal(0.0, 10 ** (-60 / 20), signal.size)
    return signal.astype(np.float32), turns


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded noise with a 1/f power spectrum (room and street noise are nearer pink than white),
    scaled to unit variance. Its lowest bins (DC included) are kept, so its mean square is a few
    tenths of a dB above its variance: the SNRs are set against the variance."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.arange(spectrum.size, dtype=np.float64)
    spectrum /= np.sqrt(np.maximum(f, 1.0))
    noise = np.fft.irfft(spectrum, n)
    return noise / noise.std()


def speech_power(signal: np.ndarray, turns: list[Turn], rate: int) -> float:
    """Mean power of the signal over the reference speech (the S of an SNR)."""
    mask = np.zeros(signal.size, dtype=bool)
    for t in turns:
        mask[round(t.start * rate) : round(t.end * rate)] = True
    return float(np.mean(signal[mask].astype(np.float64) ** 2))


def _sox(signal: np.ndarray, rate: int, out_rate: int, effects: list[str], tmp: Path) -> np.ndarray:
    """Run the signal through sox effects (no dither, so the bytes repeat)."""
    src, mid, dst = tmp / "in.wav", tmp / "mid.wav", tmp / "out.wav"
    write_wav(src, signal, rate)
    encoding = ["-e", "mu-law"] if out_rate == 8000 else []
    sox = ["sox", "-D", "-R", str(src), "-r", str(out_rate), *encoding, str(mid), *effects]
    subprocess.run(sox, check=True, capture_output=True)
    subprocess.run(["sox", "-D", "-R", str(mid), "-e", "signed", "-b", "16", str(dst)], check=True)
    out, _ = read_wav(dst)
    return out


def degrade(
    signal: np.ndarray, turns: list[Turn], condition: str, seed: int
) -> tuple[np.ndarray, int]:
    """The clean conversation as heard in `condition`: (signal, rate). Reference turns still hold.

    Reverberation smears speech past the end of a turn; the reference is not stretched, as a
    human annotator would not stretch it either.
    """
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    if condition == "clean":
        return signal, RATE
    if condition.startswith("snr"):
        snr = float(condition[3:])
        noise = _pink_noise(signal.size, rng) * np.sqrt(speech_power(signal, turns, RATE))
        out = signal + noise * 10 ** (-snr / 20.0)
        return (out / max(1.0, float(np.abs(out).max()))).astype(np.float32), RATE
    if condition == "level":
        # A step every 5-15 s, anywhere from -20 to +6 dB, over a recording 12 dB quieter.
        gain = np.ones(signal.size)
        edge = 0
        while edge < signal.size:
            step = round(rng.uniform(5.0, 15.0) * RATE)
            gain[edge : edge + step] = 10 ** ((rng.uniform(-20.0, 6.0) - 12.0) / 20.0)
            edge += step
        return (signal * gain).astype(np.float32), RATE
    with tempfile.TemporaryDirectory() as tmp:
        if condition == "reverb":
            # sox reverb: reverberance 60%, HF damping 50%, a large room, 20 ms pre-delay.
            out = _sox(signal, RATE, RATE, ["reverb", "60", "50", "90", "100", "20"], Path(tmp))
            return out[: signal.size], RATE
        if condition == "telephone":
            out = _sox(signal, RATE, 8000, ["sinc", "300-3400"], Path(tmp))
            return out, 8000
    raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")


def cache_dir() -> Path:
    """Where rendered audio lives: a folder per version of the generator (GENERATOR_VERSION and
    the source of synth.py, whose voices speak every turn)."""
    digest = hashlib.sha256(f"devset {GENERATOR_VERSION}".encode())
    digest.update((Path(__file__).parent / "synth.py").read_bytes())
    root = Path(os.environ.get("LAMPY_FISHER_DEV_DATA", "/tmp/lampy-fisher-dev"))
    return root / digest.hexdigest()[:10]


def wav_path(conversation: Conversation, condition: str) -> tuple[Path, list[Turn]]:
    """The cached wav file of a conversation in a condition (rendered on first use) and its
    reference turns.

    Files are written under a temporary name and renamed, so parallel workers never read a
    half-written file.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    clean_wav, rttm = folder / f"{conversation.name}.wav", folder / f"{conversation.name}.rttm"
    if not (clean_wav.exists() and rttm.exists()):
        signal, turns = render(conversation)
        _atomic(clean_wav, lambda p: write_wav(p, signal, RATE))
        _atomic(rttm, lambda p: p.write_text(format_rttm(turns, conversation.name)))
    turns = read_rttm(rttm)
    if condition == "clean":
        return clean_wav, turns
    wav = folder / f"{conversation.name}.{condition}.wav"
    if not wav.exists():
        clean, _ = read_wav(clean_wav)
        out, rate = degrade(clean, turns, condition, conversation.seed)
        _atomic(wav, lambda p: write_wav(p, out, rate))
    return wav, turns


def load(conversation: Conversation, condition: str) -> tuple[np.ndarray, int, list[Turn]]:
    """(signal, rate, reference turns) of a conversation in a condition."""
    wav, turns = wav_path(conversation, condition)
    signal, rate = read_wav(wav)
    return signal, rate, turns


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a unique temporary sibling, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
