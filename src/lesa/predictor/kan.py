"""A B-spline Kolmogorov-Arnold layer in the "efficient" form used by LESA's temporal gain network.

out = W_base . SiLU(x) + (W_spline * scale) . B(x), where B(x) are the cubic B-spline bases of each input on a fixed,
uniform grid. No grid updates and no KAN regularisation: LESA does not use them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def uniform_knots(grid_size: int, spline_order: int, grid_range: tuple[float, float]) -> torch.Tensor:
    """Knot vector of a uniform grid extended by `spline_order` knots on each side (grid_size + 2*order + 1 knots)."""
    lo, hi = grid_range
    step = (hi - lo) / grid_size
    return torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + lo


def bspline_bases(x: torch.Tensor, knots: torch.Tensor, spline_order: int) -> torch.Tensor:
    """All B-spline bases of order `spline_order` at `x` (Cox-de Boor recursion, vectorised).

    x: (..., in). Returns (..., in, len(knots) - 1 - spline_order).
    """
    t = knots.to(x.dtype)
    xe = x.unsqueeze(-1)
    bases = ((xe >= t[:-1]) & (xe < t[1:])).to(x.dtype)
    for p in range(1, spline_order + 1):
        left = (xe - t[: -(p + 1)]) / (t[p:-1] - t[: -(p + 1)]) * bases[..., :-1]
        right = (t[p + 1 :] - xe) / (t[p + 1 :] - t[1:-p]) * bases[..., 1:]
        bases = left + right
    return bases


class KANLinear(nn.Module):
    """One KAN layer: a SiLU base path plus a learnable cubic spline per (input, output) pair."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-3.0, 3.0),
        scale_base: float = 1.0,
        scale_spline: float = 0.2,
        scale_noise: float = 0.02,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.grid_size = grid_size
        self.spline_order = spline_order
        self.register_buffer("knots", uniform_knots(grid_size, spline_order, grid_range), persistent=False)
        n_bases = grid_size + spline_order
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, n_bases))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self._init(scale_base, scale_spline, scale_noise)

    @torch.no_grad()
    def _init(self, scale_base: float, scale_spline: float, scale_noise: float) -> None:
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * scale_base)
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * scale_spline)
        # Spline coefficients: least-squares fit of small uniform noise sampled on the grid points, so every
        # spline starts as a small random curve rather than zero.
        order = self.spline_order
        points = self.knots[order:-order]  # grid_size + 1 interior knots
        noise = (torch.rand(points.numel(), self.in_features, self.out_features) - 0.5) * scale_noise / self.grid_size
        bases = bspline_bases(points.unsqueeze(-1).expand(-1, self.in_features), self.knots, order)
        design = bases.transpose(0, 1)  # (in, points, n_bases)
        # gelsd (SVD): the default gelsy gives run-to-run different bits on this rank-deficient system on the CPU
        coeffs = torch.linalg.lstsq(design, noise.transpose(0, 1), driver="gelsd").solution  # (in, n_bases, out)
        self.spline_weight.copy_(coeffs.permute(2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(F.silu(x), self.base_weight)
        bases = bspline_bases(x, self.knots, self.spline_order).flatten(-2)
        weight = (self.spline_weight * self.spline_scaler.unsqueeze(-1)).flatten(1)
        return base + F.linear(bases, weight)


class KAN(nn.Sequential):
    """A stack of KAN layers with widths `widths` (e.g. [S+1, 256, 256, 1])."""

    def __init__(self, widths: list[int], **layer_kwargs) -> None:
        super().__init__(*[KANLinear(a, b, **layer_kwargs) for a, b in zip(widths[:-1], widths[1:], strict=True)])
