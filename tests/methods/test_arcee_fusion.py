from __future__ import annotations

import torch

from m3sb.methods import merge_group
from m3sb.methods.arcee_fusion import importance, lower_quantile


def test_quartiles_are_read_at_the_lower_index_as_mergekit_reads_them() -> None:
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.25, 0.5, 0.75):
        assert float(lower_quantile(values, q)) == float(torch.quantile(values, q, interpolation="lower"))


def test_only_the_outstanding_changes_are_taken() -> None:
    base = torch.randn(4, 25, generator=torch.Generator().manual_seed(1))
    model = base + 0.01 * torch.randn(4, 25, generator=torch.Generator().manual_seed(2))
    model[2, 3] = 5.0  # one large change
    merged = merge_group("arcee_fusion", [model], base=base)
    scores = importance(model, base)
    threshold = lower_quantile(scores, 0.5) + 1.5 * (
        lower_quantile(scores, 0.75) - lower_quantile(scores, 0.25)
    )
    chosen = scores >= threshold
    assert bool(chosen[2, 3]) and 0 < int(chosen.sum()) <= 25  # the row whose softmax moved
    assert torch.equal(merged, torch.where(chosen, model, base))
