from __future__ import annotations

import torch

from m3sb.methods import merge_group


def test_close_entries_are_swapped_whole_and_far_ones_in_proportion() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, 0.4, -2.0, 1.0])
    merged = merge_group("nearswap", [model], base=base, t=0.1)
    # weights clamp(0.1 / |d|, 0, 1): 1, 0.25, 0.05, 1 (d = 0 clamps to 1e-6)
    torch.testing.assert_close(merged, torch.tensor([0.05, 0.1, -0.1, 1.0]))
