"""Expected calibration error and the reliability diagram (Guo et al. 2017, arXiv 1706.04599)."""

import math

import pytest
import torch

from genforge.metrics import expected_calibration_error, reliability_diagram


def naive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """Eq. 5 written as the paper states it: loop over bins (lo, hi], then over samples."""
    probs, labels = probs.tolist(), labels.tolist()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).tolist()
    total = 0.0
    for m in range(n_bins):
        lo, hi = edges[m], edges[m + 1]
        members = [i for i, row in enumerate(probs) if (lo < max(row) or m == 0) and max(row) <= hi]
        if not members:
            continue
        acc = sum(probs[i].index(max(probs[i])) == labels[i] for i in members) / len(members)
        conf = sum(max(probs[i]) for i in members) / len(members)
        total += len(members) / len(probs) * abs(acc - conf)
    return total


def random_predictions(n=500, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=gen, dtype=torch.float64)
    return logits, torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_ece_equals_the_per_bin_loop_of_equation_5(n_bins):
    logits, labels = random_predictions()
    probs = logits.softmax(1)
    reference = naive_ece(probs, labels, n_bins)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(reference, abs=1e-12)


def test_ece_is_zero_when_accuracy_matches_confidence_in_every_bin():
    # Bin of confidence 0.9: 9 of 10 right; bin of confidence 0.6: 3 of 5 right.
    high = torch.tensor([[0.9, 0.1]], dtype=torch.float64).repeat(10, 1)
    low = torch.tensor([[0.4, 0.6]], dtype=torch.float64).repeat(5, 1)
    labels = torch.tensor([0] * 9 + [1] + [1, 1, 1, 0, 0])
    assert expected_calibration_error(torch.cat([high, low]), labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_hand_worked_example():
    # 10 bins. Bin (0.5, 0.6]: confidences 0.55, 0.6, one right -> |0.5 - 0.575| = 0.075, weight 2/4.
    # Bin (0.9, 1.0]: confidences 0.95, 1.0, both right -> |1 - 0.975| = 0.025, weight 2/4.
    probs = torch.tensor([[0.55, 0.45], [0.4, 0.6], [0.95, 0.05], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.5 * 0.075 + 0.5 * 0.025)
    diagram = reliability_diagram(probs, labels, n_bins=10)
    assert diagram.count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert diagram.confidence[5].item() == pytest.approx(0.575) and diagram.accuracy[5].item() == 0.5
    assert diagram.accuracy[9].item() == 1.0 and math.isnan(diagram.accuracy[0].item())


def test_logits_and_their_softmax_give_the_same_ece_and_diagram():
    logits, labels = random_predictions(seed=1)
    from_logits = reliability_diagram(logits, labels)
    from_probs = reliability_diagram(logits.softmax(1), labels)
    assert torch.equal(from_logits.count, from_probs.count)
    torch.testing.assert_close(from_logits.accuracy, from_probs.accuracy, equal_nan=True)
    from_probs_ece = expected_calibration_error(logits.softmax(1), labels)
    assert expected_calibration_error(logits, labels) == pytest.approx(from_probs_ece)


def test_diagram_counts_every_sample_once_and_weights_reproduce_ece():
    logits, labels = random_predictions(n=300, seed=2)
    diagram = reliability_diagram(logits, labels, n_bins=12)
    assert int(diagram.count.sum()) == 300
    filled = diagram.count > 0
    gaps = (diagram.accuracy[filled] - diagram.confidence[filled]).abs()
    weighted = float((diagram.count[filled] / 300 * gaps).sum())
    assert weighted == pytest.approx(expected_calibration_error(logits, labels, 12))


def test_bad_inputs_name_the_expected_shapes():
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        expected_calibration_error(torch.rand(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels of shape"):
        expected_calibration_error(torch.rand(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        expected_calibration_error(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), n_bins=0)
