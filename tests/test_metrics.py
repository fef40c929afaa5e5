"""Per-frame AP / calibrated AP against hand-computed values and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from vidpipe.malt.metrics import (average_precision, calibrated_average_precision, detection_report,
                          format_table, per_frame_metrics)


def test_average_precision_by_hand():
    # ranks: + - + -  -> precision 1/1 at recall 1/2, 2/3 at recall 2/2
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie between a positive and a negative forms one threshold: P = 1/2 at R = 1/2
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25 + 0.5 * 2 / 3)
    assert average_precision([0, 1], [0.9, 0.1]) == pytest.approx(0.5)
    assert np.isnan(average_precision([0, 0], [0.3, 0.2]))


def test_calibrated_average_precision_by_hand():
    # 2 positives, 6 negatives: ratio 3; positives at ranks 1 and 7
    y_true = [1, 0, 0, 0, 0, 0, 1, 0]
    scores = np.linspace(1, 0, 8)
    expected = (1.0 + 2 / (2 + 5 / 3)) / 2
    assert calibrated_average_precision(y_true, scores) == pytest.approx(expected)
    # with as many negatives as positives (ratio 1) cAP equals AP
    assert calibrated_average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == \
        pytest.approx(0.5 + 0.5 * 2 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.random(500) < 0.2
    # rounded scores make many ties, the case where implementations differ
    scores = np.round(rng.random(500) + 0.5 * y_true, 1)
    assert average_precision(y_true, scores) == pytest.approx(
        average_precision_score(y_true, scores), abs=1e-12)


def _calibrated_ap_loop(y_true, y_score):
    """Definition written out step by step: walk down the ranking."""
    order = np.argsort(-np.asarray(y_score))
    y = np.asarray(y_true)[order]
    ratio = (y == 0).sum() / y.sum()
    tp = fp = 0
    total = 0.0
    for label in y:
        tp, fp = tp + label, fp + (1 - label)
        if label:
            total += tp / (tp + fp / ratio)
    return total / y.sum()


@pytest.mark.parametrize("seed", range(3))
def test_calibrated_average_precision_equals_definition(seed):
    rng = np.random.default_rng(seed)
    y_true = (rng.random(300) < 0.1).astype(int)
    scores = rng.random(300) + 0.3 * y_true
    assert calibrated_average_precision(y_true, scores) == pytest.approx(
        _calibrated_ap_loop(y_true, scores), rel=1e-9)


def test_per_frame_metrics_thumos_protocol():
    names = ["background", "a", "b", "c"]
    targets = np.zeros((6, 4))
    targets[[0, 1], 0] = 1          # background
    targets[[2, 3], 1] = 1          # class a
    targets[[4, 5], 2] = 1          # class b; class c never occurs -> skipped
    scores = np.full((6, 4), 0.1)
    scores[:, 1] = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]   # a: one negative ranked first
    scores[:, 2] = [0.1, 0.1, 0.1, 0.1, 0.9, 0.8]   # b: perfect
    ambiguous = np.zeros(6, bool)
    result = per_frame_metrics(scores, targets, names)
    assert set(result.per_class) == {"a", "b"}
    assert result.per_class["a"] == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 3)
    assert result.per_class["b"] == pytest.approx(1.0)
    assert result.mean == pytest.approx((result.per_class["a"] + 1.0) / 2)
    # dropping the ambiguous frame 0 removes the negative ranked first: a becomes perfect
    ambiguous[0] = True
    result = per_frame_metrics(scores, targets, names, ambiguous=ambiguous)
    assert result.per_class["a"] == pytest.approx(1.0)
    assert result.num_frames == 5


def test_ambiguous_column_excluded_like_lstr():
    """LSTR's 22-column THUMOS arrays: the ambiguous index is left out of the mean."""
    rng = np.random.default_rng(0)
    targets = np.eye(4)[rng.integers(0, 4, 200)]
    scores = rng.random((200, 4))
    names = ["background", "a", "b", "Ambiguous"]
    result = per_frame_metrics(scores, targets, names, ignore_index=3)
    assert set(result.per_class) == {"a", "b"}
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in (1, 2)])
    assert result.mean == pytest.approx(expected)


def test_report_and_table():
    rng = np.random.default_rng(1)
    targets = np.eye(3)[rng.integers(0, 3, 100)]
    scores = rng.random((100, 3))
    report = detection_report(scores, targets, ["background", "jump", "run"])
    assert set(report["per_class"]) == {"jump", "run"}
    assert report["mAP"] == pytest.approx(np.mean([v["AP"] for v in report["per_class"].values()]))
    assert report["mcAP"] == pytest.approx(np.mean([v["cAP"] for v in report["per_class"].values()]))
    table = format_table(report)
    assert "jump" in table and table.splitlines()[-1].startswith("mean")


def test_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        per_frame_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["background", "a", "b"])
    with pytest.raises(ValueError, match="unknown metric"):
        per_frame_metrics(np.zeros((3, 2)), np.ones((3, 2)), ["background", "a"], metric="F1")
