"""Vectorized features against a plain per-frame loop written straight from the definitions."""

from pathlib import Path

import numpy as np
import pytest

import lampy
import lampy.runtime._shm
from examples.fisher import features
from examples.fisher.audio import read_wav, write_wav
from lampy.runtime import _serial as serial


def _reference_frame(x: np.ndarray, prev: np.ndarray, rate: int) -> np.ndarray:
    win = x.size
    n = win // 2
    zcr = np.sum(np.abs(np.diff(np.sign(x)))) / 2 / (win - 1)
    energy = np.sum(x**2) / win
    sub = np.array([np.sum(x[i * (win // 10) : (i + 1) * (win // 10)] ** 2) for i in range(10)])
    p = sub / (sub.sum() + 1e-10)
    energy_entropy = -np.sum(p * np.log2(p + 1e-10))
    mag = np.abs(np.fft.fft(x))[:n] / n
    prev_mag = np.abs(np.fft.fft(prev))[:n] / n
    freqs = np.array([i * rate / win for i in range(n)])
    centroid = np.sum(freqs * mag) / (mag.sum() + 1e-10)
    spread = np.sqrt(np.sum((freqs - centroid) ** 2 * mag) / (mag.sum() + 1e-10))
    bands = np.array([np.sum(mag[i * (n // 10) : (i + 1) * (n // 10)] ** 2) for i in range(10)])
    q = bands / (bands.sum() + 1e-10)
    spectral_entropy = -np.sum(q * np.log2(q + 1e-10))
    a, b = mag / (mag.sum() + 1e-10), prev_mag / (prev_mag.sum() + 1e-10)
    flux = np.sum((a - b) ** 2)
    cum = np.cumsum(mag**2)
    rolloff = np.nonzero(cum > 0.9 * cum[-1])[0][0] / n
    nyquist = rate / 2
    spectral = [centroid / nyquist, spread / nyquist, spectral_entropy, flux, rolloff]
    return np.array([zcr, energy, energy_entropy, *spectral])


def _signal(rate: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 22050])
@pytest.mark.parametrize("seconds", [0.5, 3.3, 4.0])
def test_frame_rows_hold_every_frame_and_its_predecessor(rate: int, seconds: float) -> None:
    signal = _signal(rate, seconds)
    win, hop = features.frame_geometry(rate)
    body, edges = features.frame_rows(signal, win, hop, block=8)
    tail_body, tail_edges = features.tail_rows(signal, win, hop, block=8)
    assert np.shares_memory(body, signal)  # a view: the caller copies no audio
    rows = np.hstack([np.vstack([edges, tail_edges])[:, :hop], np.vstack([body, tail_body])])
    rows = np.hstack([rows, np.vstack([edges, tail_edges])[:, hop:]])
    n = features.n_frames(signal.size, win, hop)
    assert rows.shape[0] == -(-n // 8) and tail_body.shape[0] <= 1
    padded = np.concatenate([np.zeros(hop, np.float32), signal, np.zeros(8 * hop, np.float32)])
    for i in range(-1, n):  # frame -1: the predecessor of frame 0, in zeros
        row, j = divmod(i + 1, 8) if i < 0 else divmod(i, 8)
        at = (j + 1) * hop if i >= 0 else 0
        np.testing.assert_array_equal(
            rows[row, at : at + win], padded[(i + 1) * hop : (i + 1) * hop + win]
        )


def test_short_term_features_match_per_frame_loop(executor: str) -> None:
    rate = 16000
    signal = _signal(rate, 4.0)
    feats, step = features.short_term_features(signal, rate)
    win, hop = features.frame_geometry(rate)
    assert step == 0.025
    assert feats.shape == (features.n_frames(signal.size, win, hop), len(features.FEATURE_NAMES))
    for i in [0, 1, 63, 64, 65, feats.shape[0] - 1]:
        x = signal[i * hop : i * hop + win].astype(np.float64)
        # Frame 0's predecessor starts one hop before the signal, in zeros.
        padded = np.concatenate([np.zeros(hop), signal])
        prev = padded[i * hop : i * hop + win]
        np.testing.assert_allclose(feats[i, :8], _reference_frame(x, prev, rate), rtol=1e-6)
    assert np.isfinite(feats).all()


def test_mfcc_and_chroma_per_frame(executor: str) -> None:
    rate = 16000
    signal = _signal(rate, 2.0)
    feats, _ = features.short_term_features(signal, rate)
    win, hop = features.frame_geometry(rate)
    fbank = features._filters(rate, win)[0]
    i = 10
    mag = np.abs(np.fft.fft(signal[i * hop : i * hop + win].astype(np.float64)))[: win // 2]
    mag /= win // 2
    mel = np.log10(mag @ fbank + 1e-10)
    n_mel = mel.size
    mfcc = [
        np.sqrt((1 if k == 0 else 2) / n_mel)
        * np.sum(mel * np.cos(np.pi * k * (2 * np.arange(n_mel) + 1) / (2 * n_mel)))
        for k in range(features.N_CEPSTRA)
    ]
    np.testing.assert_allclose(feats[i, 8:21], mfcc[:13], rtol=1e-6, atol=1e-9)
    # Cepstra 14.. come after the chroma, so the first 34 columns keep pyAudioAnalysis's order.
    assert features.FEATURE_NAMES[34] == "mfcc_14"
    np.testing.assert_allclose(feats[i, 34:], mfcc[13:], rtol=1e-6, atol=1e-9)
    power = mag**2
    c = np.zeros(12)
    freqs = np.arange(1, win // 2) * rate / win
    pitch = np.round(12 * np.log2(freqs / 27.5)).astype(int)
    for p in np.unique(pitch):
        c[p % 12] += power[1:][pitch == p].sum() / np.count_nonzero(pitch == p)
    c /= power.sum() + 1e-10
    np.testing.assert_allclose(feats[i, 21:33], c, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(feats[i, 33], c.std(), rtol=1e-6)
    assert np.argmax(c) == 0  # 220 Hz is an A


def test_mid_term_features_match_loop() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((97, 3))
    speech = np.ones(97, dtype=bool)
    speech[[5, 6, 30, 31, 32, 60]] = False
    mid, centres, count = features.mid_term_features(feats, speech, win=10, step=4)
    assert list(centres) == list(range(5, 93, 4))
    for row, c in enumerate(centres):
        if not speech[c]:
            assert count[row] == 0
            continue
        lo, hi = c, c
        while lo > c - 5 and speech[lo - 1]:
            lo -= 1
        while hi < c + 4 and hi + 1 < 97 and speech[hi + 1]:
            hi += 1
        chunk = feats[lo : hi + 1]
        assert count[row] == len(chunk)
        np.testing.assert_allclose(mid[row, :3], chunk.mean(axis=0), atol=1e-12)
        np.testing.assert_allclose(mid[row, 3:], chunk.std(axis=0), atol=1e-7)


def test_weighted_mid_term_features_match_loop() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((97, 3))
    weights = np.where(rng.random(97) > 0.3, 1.0, 1e-3)
    speech = np.ones(97, dtype=bool)
    speech[40:44] = False
    mid, centres, count = features.mid_term_features(feats, speech, 10, 4, None, weights)
    plain, _, _ = features.mid_term_features(feats, speech, 10, 4)
    for row, c in enumerate(centres):
        if count[row] == 0:
            continue
        lo = int(c - 5)
        while not speech[lo : c + 1].all():
            lo += 1
        hi = int(min(c + 5, 97))
        while not speech[c:hi].all():
            hi -= 1
        x, w = feats[lo:hi], weights[lo:hi]
        mean = (w[:, None] * x).sum(axis=0) / w.sum()
        std = np.sqrt((w[:, None] * (x - mean) ** 2).sum(axis=0) / w.sum())
        np.testing.assert_allclose(mid[row, :3], mean, atol=1e-12)
        np.testing.assert_allclose(mid[row, 3:], std, atol=1e-7)
        np.testing.assert_allclose(plain[row, :3], x.mean(axis=0), atol=1e-12)
    # Weights of one leave the statistics as they were.
    same, _, _ = features.mid_term_features(feats, speech, 10, 4, None, np.ones(97))
    np.testing.assert_allclose(same, plain, atol=1e-7)


def test_mid_term_statistics_do_not_depend_on_the_chunking(executor: str) -> None:
    import lampy

    rng = np.random.default_rng(3)
    feats = rng.normal(5.0, 2.0, size=(3000, 6))
    speech = rng.random(3000) > 0.1
    weights = np.where(rng.random(3000) > 0.3, 1.0, 1e-3)
    with lampy.using(executor="inline"):
        whole = features.mid_term_features(feats, speech, 40, 4, (0, 2, 5))
        weighted = features.mid_term_features(feats, speech, 40, 4, (0, 2, 5), weights)
    with lampy.using(executor=executor, chunks=5):
        chunked = features.mid_term_features(feats, speech, 40, 4, (0, 2, 5))
        chunked_weighted = features.mid_term_features(feats, speech, 40, 4, (0, 2, 5), weights)
    # std = sqrt(E[x^2] - E[x]^2): a window of one or two frames has a std of rounding noise,
    # a thousand times more where all its frames weigh 1e-3.
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-5)
    for a, b in zip(weighted, chunked_weighted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=3e-4)
    mid, centres, count = whole
    row = int(np.flatnonzero(count == 40)[0])
    window = feats[centres[row] - 20 : centres[row] + 20][:, [0, 2, 5]]
    np.testing.assert_allclose(mid[row], np.r_[window.mean(0), window.std(0)], rtol=1e-9)


def test_noise_subtraction_takes_the_noise_out_of_the_cepstra(executor: str) -> None:
    rate = 16000
    rng = np.random.default_rng(2)
    t = np.arange(6 * rate) / rate
    # A low-pass "voice" at 1-5 s, silence around it; white noise over all, 10 dB under it.
    voice = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8, mode="same")
    voice *= 0.1 * ((t >= 1) & (t < 5))
    noise = rng.standard_normal(t.size)
    noise *= np.sqrt(np.mean(voice[(t >= 1) & (t < 5)] ** 2) / np.mean(noise**2) / 10)
    noisy, step = features.short_term_features((voice + noise).astype(np.float32), rate)
    at = np.arange(noisy.shape[0]) * step
    speech = (at >= 1.05) & (at < 4.9)
    cleaned = features.subtract_noise(noisy, speech, rate)
    _, dct, _ = features._filters(rate, features.frame_geometry(rate)[0])
    columns = list(features.CEPSTRA_COLUMNS)

    def bands(feats: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Mean mel band magnitudes of some frames, back from their cepstra."""
        return (10.0 ** (feats[frames][:, columns] @ dct.T)).mean(axis=0)

    # The silence keeps about the floor (a tenth) of its noise; the voice's low bands, far
    # above the noise, keep nearly all of theirs.
    silence = (at > 0.2) & (at < 0.9)
    assert np.median(bands(cleaned, silence) / bands(noisy, silence)) < 0.2
    low = bands(cleaned, speech)[:8] / bands(noisy, speech)[:8]
    assert (low > 0.6).all()
    # Only the cepstra change; nothing is subtracted without silence to learn the noise from.
    untouched = [i for i in range(noisy.shape[1]) if i not in features.CEPSTRA_COLUMNS]
    np.testing.assert_array_equal(cleaned[:, untouched], noisy[:, untouched])
    assert features.subtract_noise(noisy, np.ones(noisy.shape[0], bool), rate) is noisy


def test_a_read_recording_reaches_the_workers_without_a_copy(executor: str, tmp_path: Path) -> None:
    """read_wav's signal, the frames' edges and the joined features live in shared memory:
    the local pool copies none of them, and the features equal those of a private copy."""
    rate = 16000
    signal = _signal(rate, 13.3)  # 13.3 s: whole rows of 64 frames, and a partial last row
    path = tmp_path / "x.wav"
    write_wav(path, signal, rate)
    read, _ = read_wav(path)
    assert lampy.asshared(read) is read
    private = np.array(read)
    assert not lampy.runtime._shm.is_shared(private)
    with lampy.using(executor="inline", chunks=4):
        want, _ = features.short_term_features(private, rate)
    before = serial.snapshot()
    with lampy.using(chunks=4):
        feats, _ = features.short_term_features(read, rate)
    copied = serial.since(before)
    np.testing.assert_allclose(feats, want, rtol=1e-12, atol=1e-15)  # BLAS threads may differ
    if executor == "local":
        assert lampy.asshared(feats) is feats  # the later regions over frames take it as it is
        assert copied.get("job", 0.0) > 0  # it fanned out ...
        assert copied.get("copy threads", 0.0) == 0.0  # ... and no byte was copied for it
        assert copied.get("copy", 0.0) == 0.0


@pytest.mark.parametrize("rate", [8000, 16000, 22050])
@pytest.mark.parametrize("seconds", [3.3, 4.0, 13.3])
def test_a_read_recording_is_cut_whole_with_no_join(
    tmp_path: Path, rate: int, seconds: float
) -> None:
    """read_wav keeps zeros after the recording, so frame_rows cuts its last, partial row as a
    view too: no tail row for the caller, and the features are the region's rows as they are
    (no serial join), equal to those of a copy without the room."""
    signal = _signal(rate, seconds)
    path = tmp_path / "x.wav"
    write_wav(path, signal, rate)
    read, _ = read_wav(path)
    win, hop = features.frame_geometry(rate)
    n = features.n_frames(read.size, win, hop)
    body, _ = features.frame_rows(read, win, hop)
    tail_body, _ = features.tail_rows(read, win, hop)
    assert np.shares_memory(body, read) and body.shape[0] == -(-n // features.BLOCK)
    assert tail_body.shape[0] == 0
    private = np.array(read)  # no room after it: cut into whole rows and a padded tail
    assert features.tail_rows(private, win, hop)[0].shape[0] == (n % features.BLOCK > 0)
    with lampy.using(executor="inline", chunks=3):
        want, _ = features.short_term_features(private, rate)
        feats, _ = features.short_term_features(read, rate)
    np.testing.assert_allclose(feats, want, rtol=1e-12, atol=1e-15)  # batches differ at the end
    # A prefix of the recording is followed by its own samples, not zeros: no room.
    cut = read[: read.size - hop * 7]
    assert features.tail_rows(cut, win, hop)[0].shape[0] == (
        features.n_frames(cut.size, win, hop) % features.BLOCK > 0
    )
