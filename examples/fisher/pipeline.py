"""The diarization pipeline: features, VAD, mid-term statistics, FLsD, speaker count, k-means,
smoothing, re-segmentation, turns."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np

# The region modules import scipy only where the caller needs it, so a worker process that
# runs their regions never loads it; loading it here keeps its import out of a stage's time.
import scipy.cluster.hierarchy
import scipy.linalg  # noqa: F401

import lampy

from . import cluster, features, flsd, vad
from .rttm import Turn, labels_to_turns
from .threads import one_blas_thread


@dataclass(frozen=True)
class Params:
    """Tuning knobs, in seconds unless stated.

    First chosen on generated 2-4 speaker conversations (2 s mid-term windows blur short turns;
    a ridge of 1e-3 overfits short recordings), then on the development set's tune split
    (`python -m examples.fisher evaluate --split tune`; docs/evaluation.md): 8 FLsD directions
    (5 could not hold 6-8 voices apart), a speaker's turns merged across pauses up to 0.6 s,
    not 1 s (that turned every pause of a monologue into false alarm; 0 s left the pauses
    inside a turn as missed speech), the speaker-count threshold, and how the turns draw on
    the VAD: pauses from 0.1 s up kept (the short one at a change of speaker) when the SNR
    allows, and one frame trimmed off each end of a speech run (the VAD's smoothing and 50 ms
    frames widen every run): clean 2-speaker DER 4.1 -> 2.7 %, count given. Third session:
    FLsD pseudo-classes inside one run of speech (0.75 s slots; the time grid put a change of
    speaker inside a class), cepstra 14-17, noise subtracted below 12 dB SNR, and the count
    threshold refit with them: count right on 95 -> 98 % of 1-4 speaker runs, 54 -> 68 % of 5-8.
    Fourth session: below 12 dB SNR the quietest 30 % of speech frames barely count in the
    mid-term statistics, and the count threshold's SNR term grows with the root of each
    merge's effective size: 98 / 68 -> 96 / 76 %, 5-8 speakers at 10 dB 55 -> 75 %.
    Fifth session (count given, clean 2-speaker DER 2.8 -> 2.1 %): turn edges next to silence
    refined to the sample (halfway in dB between background and speech; 0.4 or 0.6 of the way
    within 0.1 point), the HMM free to change speaker at a pause, and below 12 dB SNR the
    turns' speech mask at 0.4 of Otsu's split (10 dB, 3-4 speakers 3.6 -> 3.4 %).
    Seventh session: k voices judged on at most 80 k pieces of speech (the count held only on
    clips: the Fisher hour came out as 8 speakers; 20-minute conversations right 17 -> 83 %).
    """

    vad_split: float = 0.5  # speech above this share of Otsu's split of the VAD scores ...
    vad_min_gap: float = 0.25  # ... pauses shorter than this bridged ...
    vad_min_speech: float = 0.15  # ... and blips shorter than this dropped
    noisy_label_split: float = 0.4  # below subtract_below_snr, the turns' speech is above
    # this share of Otsu's split (vad_split otherwise)
    label_min_gap: float = 0.1  # pauses this long or longer stay silent in the turns ...
    label_min_snr: float = 8.0  # ... at this SNR (dB) or more; below it, vad_min_gap
    label_trim: float = 0.025  # ... and speech runs lose this much at each end
    subtract_below_snr: float = 12.0  # below this SNR (dB) the noise spectrum is subtracted
    mid_window: float = 1.0  # mid-term statistics window ...
    mid_step: float = 0.1  # ... and hop
    min_voiced: float = 0.3  # share of a window that must be speech for it to be clustered
    flsd_block: float = 0.75  # pseudo-class: this long a slot of one run of speech
    unit_block: float = 0.5  # distances count in units of a voice's spread over this long
    flsd_dims: int = 8  # FLsD directions kept
    flsd_ridge: float = 0.1  # S_w regularization, times its mean diagonal
    max_speakers: int = 8  # the count is searched over 1..max_speakers
    restarts: int = 10  # seeded k-means++ restarts
    mean_turn: float = 4.0  # expected turn length: sets the HMM's switch probability
    max_gap: float = 0.6  # same-speaker turns closer than this merge
    reach: float = 0.5  # how far re-segmentation may move a change of speaker
    short_run: float = 1.0  # a run of one speaker shorter than this is re-labelled by its frames
    count_piece: float = 0.3  # the count is judged on pieces of speech this long ...
    count_per_voice: int = 80  # ... k voices on at most k times this many, spread evenly
    noisy_frame_share: float = 0.3  # below subtract_below_snr, the quietest speech frames ...
    # ... (this share) barely count in the mid-term statistics
    count_threshold: float = 38.5  # merge height (within-block deviations) of a new speaker ...
    count_snr_slope: float = 0.094  # ... raised by this per dB of SNR below count_snr_ref, times
    count_snr_ref: float = 30.0  # the root of the merge's effective size (pieces)
    edge_reach: float = 0.05  # a turn's edge next to silence moves within this far to where
    edge_split: float = 0.5  # the 5 ms power crosses this share (in dB) of the way from the
    edge_span: float = 0.5  # background to the speech within this far inside the turn
    min_count_speech: float = 8.0  # less speech than this: the count is "cannot tell"
    confidence_slope: float = 9.7  # logistic map from the count's margin to a confidence ...
    confidence_offset: float = -0.2  # ... fitted on the tune split


@dataclass(frozen=True)
class SpeakerCount:
    """How the speaker count was settled: given, found (with a confidence) or not told.

    `known` is False when the recording holds too little speech to count its speakers; `note`
    then says why. `scores[k]` is how clearly a k-th voice stands apart (the merge height that
    joins k clusters into k - 1, over the threshold, in a tree of at most `count_per_voice` * k
    pieces: above 1 counts as a speaker).
    """

    known: bool
    confidence: float
    scores: dict[int, float]
    note: str = ""


@dataclass
class Result:
    """Turns, per-frame labels (-1 = silence), chosen k and how it was chosen, time per stage.

    `timings` is wall time per stage; `caller_cpu` the CPU time this process spent in it (all
    its threads): on a fanned-out executor that is the stage's serial remainder (work here,
    and lampy moving data and combining), the share more workers cannot shrink.
    """

    turns: list[Turn]
    frame_labels: np.ndarray
    frame_step: float
    n_speakers: int
    count: SpeakerCount
    timings: dict[str, float] = field(default_factory=dict)
    caller_cpu: dict[str, float] = field(default_factory=dict)


class DiarizationError(ValueError):
    """The recording cannot be diarized as asked (too short, or a speaker count below 1)."""


@dataclass
class _Clock:
    """Wall and caller CPU time per stage."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[stage] = time.perf_counter() - start
        self.cpu[stage] = time.process_time() - cpu


def snr_db(energy: np.ndarray, speech: np.ndarray) -> float:
    """Rough speech-to-background ratio in dB from frame energies and the speech mask."""
    if speech.all() or not speech.any():
        return 60.0
    background = max(float(energy[~speech].mean()), 1e-12)
    return min(60.0, 10.0 * math.log10(max(float(energy[speech].mean()), 1e-12) / background))


def count_speakers(
    y: np.ndarray, segment: np.ndarray, snr: float, p: Params, windows_per_piece: int
) -> tuple[int, SpeakerCount]:
    """The number of speakers, by agglomerative (Ward) merging of short pieces of speech.

    `y` is in units of the FLsD pseudo-classes' own spread, so one threshold on the merge
    height serves every recording: merges above it join different voices. Noise splits one
    voice by the loudness of its turns, moving the two sides' centroids apart by a distance
    that grows as the SNR falls, whatever the voice's length; a Ward height is that distance
    times the square root of the merge's effective size, so the threshold rises with the SNR
    deficit times that root (a long monologue's loud and quiet halves merge high; the quiet
    halves of one of eight voices, low). The confidence grows with the margin (log ratio)
    between the threshold and the nearest merge heights on either side of it. Whether there
    are k voices is judged on at most `count_per_voice` * k pieces spread evenly over the
    speech (`cluster.voice_merges`): a Ward height grows with the pieces' number, and the
    threshold was set on clips of a few minutes, so an hour would split every voice.
    """
    deficit = max(0.0, p.count_snr_ref - snr)
    pieces = cluster.piece_means(y, segment, windows_per_piece)
    heights, sizes = cluster.voice_merges(pieces, p.max_speakers, p.count_per_voice)
    heights = heights / (p.count_threshold + p.count_snr_slope * deficit * np.sqrt(sizes))
    above = np.flatnonzero(heights[: p.max_speakers - 1] > 1.0)
    k = int(above.max()) + 2 if above.size else 1
    margins = [math.log(heights[k - 2])] if k > 1 else []
    if k < p.max_speakers and heights[k - 1] > 0:
        margins.append(-math.log(heights[k - 1]))
    margin = min(margins, default=0.0)
    z = p.confidence_slope * margin + p.confidence_offset
    confidence = 1.0 / (1.0 + math.exp(-z))
    scores = {j + 2: round(float(h), 3) for j, h in enumerate(heights[: p.max_speakers - 1])}
    return k, SpeakerCount(True, round(confidence, 3), scores)


def _not_finite(signal: np.ndarray, rate: int) -> str:
    """Why the features are not finite: the signal's NaN or infinite samples."""
    bad = np.flatnonzero(~np.isfinite(signal))
    if not bad.size:
        return "the features are not finite numbers: are the samples far outside [-1, 1]?"
    return (
        f"the signal holds {bad.size} samples that are not numbers (NaN or infinity), "
        f"the first at {bad[0] / rate:.3f} s"
    )


def _unit_spread(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Scale y so its rows deviate from their pseudo-class mean by 1 on average (rms), into
    lampy's shared memory: every k-means iteration is a region over these rows, which the
    local pool's workers then read where they are (no copy per iteration)."""
    n = np.bincount(classes).astype(np.float64)
    means = flsd.class_sums(y, classes, n.size) / np.maximum(n, 1.0)[:, None]
    spread = math.sqrt(float(((y - means[classes]) ** 2).sum(axis=1).mean()))
    return np.divide(y, max(spread, 1e-12), out=lampy.empty(y.shape))


def _distance_to_nearest(values: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each value, the distance to the nearest of `others` (sorted); inf when none."""
    if others.size == 0:
        return np.full(values.size, np.inf)
    at = np.clip(np.searchsorted(others, values), 1, others.size)
    below = np.abs(values - others[at - 1])
    above = np.abs(others[np.minimum(at, others.size - 1)] - values)
    return np.minimum(below, above)


def refine_edges(
    turns: list[Turn],
    signal: np.ndarray,
    rate: int,
    energy: np.ndarray,
    speech: np.ndarray,
    voiced: np.ndarray,
    step: float,
    offset: float,
    p: Params,
) -> list[Turn]:
    """Turns whose edges next to silence sit where the speech really starts and ends.

    The VAD decides per 25 ms frame, after smoothing, so an edge is off by up to a frame or
    so. Each edge next to silence moves (within `edge_reach`, and no further than halfway to
    the neighbouring turn's edge, so it never runs into the next voice) to where the power over
    5 ms crosses the point `edge_split` of the way, in dB, from the background (the mean power
    of the VAD's silence) to the speech near the edge (the mean dB of the voiced frames within
    `edge_span` inside the turn): halfway is the geometric mean of the two, a level that
    follows both the room and the turn. Edges between two speakers stay where the
    re-segmentation put them. The crossings are a region over the edges (`vad.edge_crossings`).
    """
    if not turns or p.edge_reach <= 0:
        return turns
    starts = np.array([t.start for t in turns])
    ends = np.array([t.end for t in turns])
    # An edge within a frame of another turn's edge is a change of speaker, not silence.
    free = np.concatenate(
        [
            _distance_to_nearest(starts, np.sort(ends)) > step / 2,
            _distance_to_nearest(ends, np.sort(starts)) > step / 2,
        ]
    )
    times = np.concatenate([starts, ends])[free]
    rising = np.concatenate([np.ones(starts.size, bool), np.zeros(ends.size, bool)])[free]
    if times.size == 0:
        return turns
    silent = energy[~speech] if (~speech).any() else np.sort(energy)[: max(1, energy.size // 20)]
    background = 10.0 * math.log10(max(float(silent.mean()), 1e-12))
    # Mean dB of the voiced frames within edge_span inside each edge: prefix sums over frames.
    level = 10.0 * np.log10(np.maximum(energy, 1e-12))
    sums = np.concatenate([[0.0], np.cumsum(np.where(voiced, level, 0.0))])
    counts = np.concatenate([[0], np.cumsum(voiced)])
    frame = np.clip(np.round((times - offset) / step).astype(np.int64), 0, energy.size)
    span = max(1, round(p.edge_span / step))
    lo = np.where(rising, frame, np.maximum(frame - span, 0))
    hi = np.where(rising, np.minimum(frame + span, energy.size), frame)
    n = counts[hi] - counts[lo]
    near = np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), background)
    threshold = 10.0 ** ((background + p.edge_split * (near - background)) / 10.0)
    # An edge stays on its side of the point halfway to the other turn's nearest edge (the end
    # before a start, the start after an end), so it never runs into the next voice.
    before, after = np.sort(ends), np.sort(starts)
    at = np.searchsorted(before, times, side="right") - 1
    previous_end = np.where(at >= 0, before[np.maximum(at, 0)], -np.inf)
    at = np.searchsorted(after, times, side="left")
    next_start = np.where(at < after.size, after[np.minimum(at, after.size - 1)], np.inf)
    halfway = np.where(rising, (times + previous_end) / 2.0, (times + next_start) / 2.0)
    centre = np.round(times * rate).astype(np.int64)
    reach, half = round(p.edge_reach * rate), round(0.0025 * rate)
    bound = np.clip(np.nan_to_num(halfway * rate), centre - reach - 1, centre + reach + 1)
    limit = np.round(bound).astype(np.int64)
    hop = max(1, round(0.001 * rate))
    moved = vad.edge_crossings(centre, threshold, rising, limit, signal, reach, half, hop)
    moved = np.asarray(moved)
    new_starts, new_ends = starts.copy(), ends.copy()
    edge_times = moved / rate
    new_starts[free[: starts.size]] = edge_times[rising]
    new_ends[free[starts.size :]] = edge_times[~rising]
    return [
        Turn(float(a), float(b), t.speaker) if b > a else t
        for a, b, t in zip(new_starts, new_ends, turns, strict=True)
    ]


def diarize(
    signal: np.ndarray,
    rate: int,
    n_speakers: int | None = None,
    seed: int = 0,
    params: Params | None = None,
) -> Result:
    """Who spoke when: turns with anonymous labels spk0, spk1, ... in order of first appearance.

    With `n_speakers` None the count is found (1..max_speakers; `Result.count` says how sure),
    or reported as "cannot tell" when there is too little speech to count. Executor choice is
    the caller's: wrap the call in `lampy.using(executor=...)`.
    """
    p = params or Params()
    if n_speakers is not None and n_speakers < 1:
        raise DiarizationError(f"the number of speakers must be at least 1, got {n_speakers}")
    if signal.size < 2 * p.mid_window * rate:
        raise DiarizationError(
            f"{signal.size / rate:.2f} s of audio; need at least {2 * p.mid_window:.2f} s"
        )
    # Every product here is small (a batch of frames, the FLsD matrices, k-means): a second
    # BLAS thread only busy-waits (examples/fisher/threads.py).
    with one_blas_thread():
        return _stages(signal, rate, n_speakers, seed, p)


def _stages(signal: np.ndarray, rate: int, n_speakers: int | None, seed: int, p: Params) -> Result:
    """`diarize` past its checks: the stages, each timed."""
    timed = _Clock()
    with timed("features"):
        feats, step = features.short_term_features(signal, rate)
    with timed("vad"):
        to_levels = features.mfcc_to_mel_db(rate)
        score = vad.speech_score(feats, step, to_levels, columns=features.MFCC_COLUMNS)
        if not np.isfinite(score).all():  # a NaN or infinite sample spreads to every score
            raise DiarizationError(_not_finite(signal, rate))
        mask = partial(vad.speech_mask, score, step, min_speech=p.vad_min_speech)
        speech = mask(min_gap=p.vad_min_gap, split=p.vad_split)
        snr = snr_db(feats[:, 1], speech)
        # Clustering sees pauses under vad_min_gap bridged (short runs make poor windows and
        # pieces); the turns keep every pause from label_min_gap up, such as the short one at
        # a change of speaker, and trim the VAD's widening of every run, unless noise makes
        # such short dips and quiet edges unreliable.
        trim = round(p.label_trim / step)
        fine = snr >= p.label_min_snr
        noisy = snr < p.subtract_below_snr
        split = p.noisy_label_split if noisy else p.vad_split
        voiced = vad.shrink(mask(min_gap=p.label_min_gap, split=split), trim) if fine else speech
        if noisy:
            feats = features.subtract_noise(feats, speech, rate)
    with timed("mid-term"):
        win, hop = round(p.mid_window / step), round(p.mid_step / step)
        voice = features.VOICE_COLUMNS
        # In noise the quiet frames of a turn are mostly noise, and more so in a quiet turn:
        # the statistics leave them out, so a voice's loud and quiet turns look alike.
        reliable = None
        if snr < p.subtract_below_snr:
            floor = np.quantile(score[speech], p.noisy_frame_share)
            reliable = np.where(score > floor, 1.0, 1e-3)
        mid, centres, count = features.mid_term_features(feats, speech, win, hop, voice, reliable)
        keep = count >= p.min_voiced * win
        kept = centres[keep]
    spoken = float(np.count_nonzero(speech)) * step
    too_little = f"only {spoken:.1f} s of speech; need {p.min_count_speech:.0f} s to count speakers"
    if kept.size < 10:
        # Nothing to cluster: no turns, and no pretence of a count.
        note = "no speech found" if kept.size == 0 else too_little
        silent = SpeakerCount(False, 0.0, {}, note)
        return Result([], np.full(speech.size, -1), step, 0, silent, timed.wall, timed.cpu)
    with timed("flsd"):
        x = flsd.standardize(mid[keep])
        segment = vad.run_index(speech)[kept]
        # Pseudo-classes stay inside one run of speech: a pause is where speakers change.
        classes = flsd.run_blocks(kept * step, segment, p.flsd_block)
        w = flsd.flsd_projection(x, classes, p.flsd_dims, p.flsd_ridge)
        y = _unit_spread(x @ w, flsd.time_blocks(kept * step, p.unit_block))
    with timed("cluster"):
        if n_speakers is not None:
            k, counted = n_speakers, SpeakerCount(True, 1.0, {}, "given")
        elif spoken < p.min_count_speech:
            # Speech enough to label, too little to count: one label, flagged as a guess.
            k, counted = 1, SpeakerCount(False, 0.0, {}, too_little)
        else:
            k, counted = count_speakers(y, segment, snr, p, round(p.count_piece / p.mid_step))
        _, centroids, _ = cluster.kmeans(y, k, seed=seed, restarts=p.restarts)
    with timed("smooth"):
        stay = 1.0 - p.mid_step / p.mean_turn
        # Across a pause every speaker is equally likely next: speakers change at pauses.
        path = cluster.viterbi(y, centroids, stay, pauses=segment[1:] != segment[:-1])
        path = cluster.first_appearance(path)
        # Every speech frame takes the label of the nearest clustered window.
        nearest = np.searchsorted((kept[:-1] + kept[1:]) / 2.0, np.arange(speech.size))
        frame_labels = np.where(voiced, path[nearest], -1)
    with timed("resegment"):
        frame_labels = cluster.resegment(
            feats, frame_labels, round(p.reach / step), voice, short_run=round(p.short_run / step)
        )
        # A frame stands for the hop-long stretch around its window's centre.
        offset = (features.frame_geometry(rate)[0] / rate - step) / 2.0
        turns = labels_to_turns(frame_labels, step, p.max_gap, offset)
        turns = refine_edges(turns, signal, rate, feats[:, 1], speech, voiced, step, offset, p)
    return Result(turns, frame_labels, step, k, counted, timed.wall, timed.cpu)
