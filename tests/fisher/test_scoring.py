import pytest

from examples.fisher.rttm import Turn
from examples.fisher.scoring import score

REF = [Turn(0.0, 4.0, "A"), Turn(5.0, 9.0, "B")]


def test_perfect_with_other_names_is_zero() -> None:
    s = score(REF, [Turn(0.0, 4.0, "x"), Turn(5.0, 9.0, "y")])
    assert s.der == 0.0 and s.der_collar == 0.0
    assert s.cluster_purity == 1.0 and s.speaker_purity == 1.0
    assert s.mapping == {"x": "A", "y": "B"}


def test_missed_speech() -> None:
    s = score(REF, [Turn(0.0, 4.0, "x"), Turn(5.0, 7.0, "y")])
    assert s.missed == pytest.approx(2 / 8)
    assert s.false_alarm == 0.0 and s.confusion == 0.0


def test_false_alarm() -> None:
    s = score(REF, [Turn(0.0, 4.5, "x"), Turn(5.0, 9.0, "y")])
    assert s.false_alarm == pytest.approx(0.5 / 8)
    assert s.der == pytest.approx(0.5 / 8)


def test_confusion_with_one_cluster() -> None:
    s = score(REF, [Turn(0.0, 4.0, "x"), Turn(5.0, 9.0, "x")])
    assert s.confusion == pytest.approx(0.5)
    assert s.cluster_purity == pytest.approx(0.5)
    assert s.speaker_purity == pytest.approx(1.0)


def test_too_many_clusters() -> None:
    hyp = [Turn(0.0, 2.0, "x"), Turn(2.0, 4.0, "z"), Turn(5.0, 9.0, "y")]
    s = score(REF, hyp)
    assert s.confusion == pytest.approx(2 / 8)
    assert s.cluster_purity == pytest.approx(1.0)
    assert s.speaker_purity == pytest.approx(6 / 8)


def test_collar_forgives_boundary_errors() -> None:
    hyp = [Turn(0.2, 4.2, "x"), Turn(5.0, 9.0, "y")]
    s = score(REF, hyp, collar=0.25)
    assert s.der == pytest.approx(0.4 / 8)
    assert s.der_collar == 0.0


def test_overlapping_reference_speech() -> None:
    ref = [Turn(0.0, 4.0, "A"), Turn(2.0, 4.0, "B")]
    s = score(ref, [Turn(0.0, 4.0, "x")])
    assert s.missed == pytest.approx(2 / 6)
    assert s.der == pytest.approx(2 / 6)
