"""Metrics of the workbench against hand-constructed cases with known answers."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from masked_optim.workbench.data import ForgetSpec, ImageDataset, ImageSet, UnlearningSplit
from masked_optim.workbench.metrics import Metrics, accuracy, avg_gap, evaluate, mia_efficacy, \
    svc_mia_efficacy, true_label_confidence

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
