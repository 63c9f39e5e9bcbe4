"""GatedMLP: formula, hidden size rounding, mamba_ssm parameter names."""

import torch
import torch.nn.functional as F

from mamba_pkg.models.mlp import GatedMLP


def test_formula_and_shapes():
    mlp = GatedMLP(16, hidden_features=40, out_features=8, multiple_of=16, bias=True)
    assert mlp.fc1.weight.shape == (96, 16) and mlp.fc2.weight.shape == (8, 48)
    x = torch.randn(2, 5, 16)
    a, g = (x @ mlp.fc1.weight.T + mlp.fc1.bias).chunk(2, dim=-1)
    ref = (a * F.silu(g)) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert torch.allclose(mlp(x), ref, atol=1e-6)


def test_default_hidden_and_activation():
    mlp = GatedMLP(48, activation=F.gelu)
    assert mlp.fc1.weight.shape == (2 * 128, 48)  # int(8 * 48 / 3) = 128, already a multiple of 128
    assert set(mlp.state_dict()) == {"fc1.weight", "fc2.weight"}
    x = torch.randn(3, 48)
    a, g = mlp.fc1(x).chunk(2, dim=-1)
    assert torch.allclose(mlp(x), mlp.fc2(a * F.gelu(g)), atol=1e-6)
