import torch

from lesa.predictor import KAN, KANLinear, LESAPredictor, PredictorConfig, bspline_bases, uniform_knots


def direct_bspline(i: int, p: int, knots: list[float], x: float) -> float:
    """Textbook Cox-de Boor recursion for one basis function at one point."""
    if p == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + p] - knots[i]) * direct_bspline(i, p - 1, knots, x)
    right = (knots[i + p + 1] - x) / (knots[i + p + 1] - knots[i + 1]) * direct_bspline(i + 1, p - 1, knots, x)
    return left + right


def test_knots_follow_the_spec():
    knots = uniform_knots(5, 3, (-3.0, 3.0))
    assert knots.numel() == 5 + 2 * 3 + 1
    assert torch.allclose(knots[3:-3], torch.linspace(-3, 3, 6))  # the grid itself
    assert torch.allclose(knots[1:] - knots[:-1], torch.full((11,), 1.2))  # 3 extension knots a side, same step


def test_bspline_bases_match_direct_recursion():
    knots = uniform_knots(5, 3, (-3.0, 3.0))
    xs = torch.linspace(-4.5, 4.5, 37, dtype=torch.float64)
    bases = bspline_bases(xs.unsqueeze(-1), knots.double(), 3)[:, 0]  # (37, 8)
    assert bases.shape == (37, 8)
    for row, x in enumerate(xs.tolist()):
        for i in range(8):
            assert abs(bases[row, i].item() - direct_bspline(i, 3, knots.tolist(), x)) < 1e-12


def test_bases_sum_to_one_on_the_grid_range():
    knots = uniform_knots(5, 3, (-3.0, 3.0))
    xs = torch.linspace(-2.99, 2.99, 50).unsqueeze(-1)
    assert torch.allclose(bspline_bases(xs, knots, 3).sum(-1), torch.ones(50, 1), atol=1e-6)


def test_kan_layer_equals_its_formula():
    torch.manual_seed(0)
    layer = KANLinear(4, 3)
    x = torch.randn(5, 4)
    expected = torch.zeros(5, 3)
    bases = bspline_bases(x, layer.knots, 3)  # (5, 4, 8)
    for o in range(3):
        for i in range(4):
            spline = (bases[:, i] * layer.spline_weight[o, i]).sum(-1) * layer.spline_scaler[o, i]
            expected[:, o] += layer.base_weight[o, i] * torch.nn.functional.silu(x[:, i]) + spline
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_kan_is_trainable():
    torch.manual_seed(0)
    kan = KAN([3, 8, 1])
    x = torch.rand(64, 3) * 2 - 1
    y = torch.sin(3 * x[:, :1]) + x[:, 1:2] ** 2
    opt = torch.optim.Adam(kan.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = ((kan(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_paper_sized_predictor_has_about_2_37m_parameters():
    config = PredictorConfig(
        model_class="FluxTransformer2DModel",
        tap="t",
        num_steps=50,
        sigmas=[1 - i / 50 for i in range(51)],
        feature_dim=3072,
    )
    n = LESAPredictor(config).num_parameters()
    assert 2.30e6 < n < 2.40e6, n
