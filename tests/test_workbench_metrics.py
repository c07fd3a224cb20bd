"""Metrics of the workbench against hand-constructed cases with known answers."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from masked_optim.workbench.data import ForgetSpec, ImageDataset, ImageSet, UnlearningSplit
from masked_optim.workbench.metrics import COLLAPSE_MARGIN, Metrics, accuracy, avg_gap, evaluate, \
    is_collapsed, majority_rate, mia_efficacy, svc_mia_efficacy, true_label_confidence

class ConfidenceProbe(nn.Module):
    """Two-class model whose softmax probability of class 0 is the (single) input value."""

    def forward(self, x):
        p = x.flatten(1)[:, 0].clamp(1e-6, 1 - 1e-6)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def _imageset(values, labels=None):
    x = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.zeros(len(values), dtype=torch.long) if labels is None else torch.tensor(labels)
    # scale 1, mean 0, std 1: batch() hands the stored values through unchanged.
    return ImageSet(x, y, 1.0, (0.0,), (1.0,))


def _split(train_values, test_values, forget_idx):
    train, test = _imageset(train_values), _imageset(test_values)
    data = ImageDataset("probe", train, test, ("a", "b"))
    forget = torch.tensor(forget_idx)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[forget] = False
    return UnlearningSplit(data, ForgetSpec("random", 0.5), forget, keep.nonzero().flatten(),
                           torch.arange(len(test)))


def test_svc_mia_separable_case_counts_targets_on_the_non_member_side():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.9, 1.0, 200)
    non_members = rng.uniform(0.0, 0.1, 200)
    targets = np.concatenate([rng.uniform(0.0, 0.1, 30), rng.uniform(0.9, 1.0, 70)])
    assert svc_mia_efficacy(members, non_members, targets) == pytest.approx(30.0)
    assert svc_mia_efficacy(members, non_members, members[:50]) == pytest.approx(0.0)
    assert svc_mia_efficacy(members, non_members, non_members[:50]) == pytest.approx(100.0)


def test_mia_efficacy_uses_first_n_retain_samples_as_members():
    n = 40
    rng = np.random.default_rng(1)
    # Retain: n confident members first, then 3n low-confidence samples that must NOT be used as
    # members (if they were, low confidence would look like membership and the answer changes).
    retain_vals = list(rng.uniform(0.93, 1.0, n)) + list(rng.uniform(0.0, 0.07, 3 * n))
    forget_vals = list(rng.uniform(0.0, 0.07, 10)) + list(rng.uniform(0.93, 1.0, 30))
    test_vals = list(rng.uniform(0.0, 0.07, n))
    split = _split(forget_vals + retain_vals, test_vals, list(range(len(forget_vals))))
    assert mia_efficacy(ConfidenceProbe(), split) == pytest.approx(25.0)


def test_true_label_confidence_is_softmax_of_the_label_column():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [-2.0, 1.0, 0.0]])
    labels = [1, 2, 0]
    data = ImageSet(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor(labels), 1.0, (0.0,), (1.0,))

    class Table(nn.Module):
        def forward(self, x):
            return logits[x.flatten().long()]

    got = true_label_confidence(Table(), data, torch.arange(3))
    e = np.exp(logits.numpy().astype(np.float64))
    want = (e / e.sum(1, keepdims=True))[np.arange(3), labels]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_accuracy_counts_by_hand_and_gives_no_credit_for_nan():
    data = ImageSet(torch.arange(6.0).view(6, 1, 1, 1), torch.tensor([0, 1, 0, 1, 1, 1]), 1.0,
                    (0.0,), (1.0,))

    class Parity(nn.Module):  # predicts x mod 2
        def forward(self, x):
            odd = x.flatten() % 2
            return torch.stack([1 - odd, odd], dim=1)

    # predictions 0,1,0,1,0,1 against labels 0,1,0,1,1,1: 5 of 6 right.
    assert accuracy(Parity(), data, torch.arange(6)) == pytest.approx(500 / 6)
    assert accuracy(Parity(), data, torch.tensor([4])) == 0.0

    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 2), float("nan"))

    assert accuracy(Broken(), data, torch.arange(6)) == 0.0
    assert np.all(true_label_confidence(Broken(), data, torch.arange(6)) == 0.0)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2), nn.Dropout(0.9))
    data = ImageSet(torch.randn(50, 1, 1, 1), torch.randint(0, 2, (50,)), 1.0, (0.0,), (1.0,))
    model.train()
    a = true_label_confidence(model, data, torch.arange(50))
    b = true_label_confidence(model, data, torch.arange(50))
    np.testing.assert_array_equal(a, b)  # dropout off
    assert model.training and model[2].training


def test_avg_gap_closed_form():
    m = Metrics(FA=10.0, RA=90.0, TA=80.0, MIA=50.0)
    r = Metrics(FA=0.0, RA=100.0, TA=85.0, MIA=40.0)
    assert avg_gap(m, r) == pytest.approx((10 + 10 + 5 + 10) / 4)
    assert avg_gap(r, r) == 0.0
    assert avg_gap(m.as_dict(), r) == avg_gap(m, r)
    assert m.UA == 90.0


def test_evaluate_on_probe_split():
    split = _split([0.9, 0.2, 0.8, 0.7, 0.6], [0.95, 0.1, 0.3], [1, 3])
    met = evaluate(ConfidenceProbe(), split)
    # label 0 is predicted when p > 0.5: forget {0.2, 0.7} -> 50 %, retain {0.9, 0.8, 0.6} -> 100 %,
    # test {0.95, 0.1, 0.3} -> 1/3.
    assert met.FA == pytest.approx(50.0)
    assert met.RA == pytest.approx(100.0)
    assert met.TA == pytest.approx(100 / 3)
    assert 0.0 <= met.MIA <= 100.0 and not math.isnan(met.MIA) and not met.diverged
    # evaluate() shares its forward passes; mia_efficacy() computes its own: they must agree.
    assert met.MIA == mia_efficacy(ConfidenceProbe(), split)


def test_evaluate_flags_non_finite_outputs():
    split = _split([0.9, 0.2, 0.8, 0.7], [0.95, 0.1], [1])

    class Overflow(nn.Module):  # finite weights, overflowing logits: the GA failure mode
        def forward(self, x):
            return torch.stack([x.flatten() * 1e39, -x.flatten()], dim=1)

    met = evaluate(Overflow(), split)
    assert met.diverged and met.RA == 0.0 and met.FA == 0.0
    assert set(met.as_dict()) == {"FA", "RA", "TA", "MIA", "UA"}


def test_majority_rate_by_hand():
    # class 2 holds 4 of 8 labels; the other classes 2, 1 and 1.
    labels = [0, 0, 1, 2, 2, 2, 2, 3]
    assert majority_rate(labels) == pytest.approx(50.0)
    assert majority_rate(torch.tensor(labels)) == pytest.approx(50.0)
    assert majority_rate(np.array([7, 7, 9])) == pytest.approx(200 / 3)  # labels need not start at 0
    assert majority_rate([5]) == 100.0
    assert math.isnan(majority_rate([]))


def test_collapse_rule_is_majority_plus_ten_points():
    assert COLLAPSE_MARGIN == 10.0
    assert is_collapsed(60.0, 50.0)  # the boundary is collapsed
    assert not is_collapsed(60.01, 50.0)
    assert is_collapsed(0.0, 10.0) and is_collapsed(20.0, 10.0) and not is_collapsed(95.0, 10.0)
    assert is_collapsed(31.0, 11.0, margin=20.0) and not is_collapsed(31.0, 11.0)
    assert not is_collapsed(float("nan"), 50.0) and not is_collapsed(50.0, float("nan"))


def _labelled_split(train_values, train_labels, test_values, test_labels, forget_idx):
    train, test = _imageset(train_values, train_labels), _imageset(test_values, test_labels)
    data = ImageDataset("probe", train, test, ("a", "b"))
    forget = torch.tensor(forget_idx)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[forget] = False
    return UnlearningSplit(data, ForgetSpec("random", 0.5), forget, keep.nonzero().flatten(),
                           torch.arange(len(test)))


@pytest.mark.parametrize("n_wrong, ra, collapsed", [(0, 100.0, False), (2, 80.0, False),
                                                    (3, 70.0, True), (4, 60.0, True)])
def test_evaluate_flags_collapse_against_the_hand_computed_majority(n_wrong, ra, collapsed):
    # Retain labels: six 0s and four 1s, so the majority rate is 60 % and the threshold 70 %.
    retain_labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 0]
    # ConfidenceProbe predicts class 0 when the value is above 0.5: the right value per label,
    # then the first n_wrong class-1 samples turned into class-0 predictions.
    values = [0.9 if y == 0 else 0.1 for y in retain_labels]
    for i in [i for i, y in enumerate(retain_labels) if y == 1][:n_wrong]:
        values[i] = 0.9
    forget_values, forget_labels = [0.9, 0.1], [0, 1]
    split = _labelled_split(forget_values + values, forget_labels + retain_labels, [0.9, 0.1], [0, 1],
                            [0, 1])
    met = evaluate(ConfidenceProbe(), split)
    assert met.RA == pytest.approx(ra)
    assert met.collapsed is collapsed and not met.diverged
    assert "collapsed" not in met.as_dict()


def test_constant_model_is_collapsed_and_a_good_one_is_not():
    retain_labels = [0] * 3 + [1] * 7  # majority 70 %
    values = [0.9] * 3 + [0.1] * 7
    split = _labelled_split([0.9, 0.9] + values, [0, 0] + retain_labels, [0.9, 0.1], [0, 1], [0, 1])

    class AlwaysOne(nn.Module):  # predicts the majority class: RA 70 %, exactly the majority rate
        def forward(self, x):
            return torch.tensor([0.0, 1.0]).expand(len(x), 2)

    met = evaluate(AlwaysOne(), split)
    assert met.RA == pytest.approx(70.0) and met.collapsed
    assert not evaluate(ConfidenceProbe(), split).collapsed  # RA 100 %
