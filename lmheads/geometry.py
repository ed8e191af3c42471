"""How alike two token matrices over the same vocabulary are: linear CKA (Kornblith et al. 2019) and the
overlap of each token's nearest neighbours. Press & Wolf (2017, sec. 4) and Lopardo et al. (2026) ask
whether a tied matrix ends up like an untied model's input embedding or like its output matrix."""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same rows (tokens): x (V, d1),
    y (V, d2). 1 for matrices equal up to rotation and isotropic scaling, near 0 for unrelated ones
    (Kornblith et al. 2019, eq. 5): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns."""
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (y.T @ x).square().sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def nearest_neighbours(x: Tensor, k: int = 10, chunk: int = 1024) -> Tensor:
    """(V, k) ids of each row's k most cosine-similar other rows, in chunks of rows (V x V never held)."""
    unit = torch.nn.functional.normalize(x.float(), dim=1)
    out = []
    for start in range(0, unit.size(0), chunk):
        sims = unit[start : start + chunk] @ unit.T  # (C, V)
        rows = torch.arange(start, start + sims.size(0))
        sims[torch.arange(sims.size(0)), rows] = float("-inf")  # not its own neighbour
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def neighbour_overlap(x: Tensor, y: Tensor, k: int = 10) -> Tensor:
    """(V,) for each token, the share of its k nearest neighbours (cosine) in x that are also among its k
    nearest in y. Unrelated matrices give about k / V; the same geometry gives 1."""
    return shared_neighbours(nearest_neighbours(x, k), nearest_neighbours(y, k))


def shared_neighbours(a: Tensor, b: Tensor) -> Tensor:
    """(V,) the share of each row's neighbours in ``a`` (V, k) that are also in ``b`` (V, k): the overlap
    of two :func:`nearest_neighbours` results, for a matrix compared with several others."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().mean(1)  # (V, k, k) -> (V,)
