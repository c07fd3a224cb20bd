"""The digits problems of parts (a)(ii), (b) and (c): scikit-learn's digits (no download), a small MLP
trained a few epochs, forget / retain / test splits, and mini-batch sampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        _DIGITS = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    return _DIGITS


def digits_problem(seed: int, scenario: str, epochs: int) -> dict[str, Any]:
    """Train a 64-32-10 ReLU MLP for a few epochs (Adam); split test 20 %, forget = a random 10 % of the
    training set ('random') or every training sample of class 0 ('class'). Returned in float64."""
    X, y = digits_data()
    gen = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=gen)
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    if scenario == "random":
        n_f = len(train) // 10
        forget, retain = train[:n_f], train[n_f:]
    elif scenario == "class":
        forget, retain = train[y[train] == 0], train[y[train] != 0]
    else:
        raise ValueError(scenario)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(X[b]), y[b]).backward()
            opt.step()
    model = model.double()
    Xd = X.double()
    return dict(model=model, Xf=Xd[forget], yf=y[forget], Xr=Xd[retain], yr=y[retain], Xt=Xd[test], yt=y[test],
                scenario=scenario, seed=seed)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(X)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()


def sample(gen: torch.Generator, X: torch.Tensor, y: torch.Tensor, n: int, exclude: torch.Tensor | None = None):
    idx = torch.randperm(len(y), generator=gen)
    if exclude is not None:
        idx = idx[~torch.isin(idx, exclude)]
    idx = idx[:n]
    return (X[idx], y[idx]), idx
