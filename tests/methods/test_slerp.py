from __future__ import annotations

import math

import torch

from m3sb.methods.slerp import slerp


def test_whole_tensor_slerp_is_not_row_wise() -> None:
    """Rows meeting at different angles: the whole-tensor arc differs from mergekit's per-row arcs."""
    x0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    x1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    merged = slerp([x0, x1], [1.0, 1.0], t=0.5)
    # whole tensors meet at 60 degrees (cosine 1/2); the midpoint is 30 degrees from each
    u0, u1 = x0.flatten() / x0.norm(), x1.flatten() / x1.norm()
    theta = math.pi / 3
    direction = (math.sin(theta / 2) * (u0 + u1)) / math.sin(theta)
    assert torch.allclose(merged.flatten(), direction * math.sqrt(2), atol=1e-12)
    assert torch.allclose(merged, torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64) / math.sqrt(3))
    row_wise_first_row = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    assert not torch.allclose(merged[0], row_wise_first_row, atol=1e-3)
