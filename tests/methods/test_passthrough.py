from __future__ import annotations

import pytest
import torch

from m3sb.errors import ConfigError
from m3sb.methods import merge_group


def test_passthrough_copies_or_scales_its_one_input() -> None:
    tensor = torch.tensor([1.0, -2.0])
    copied = merge_group("passthrough", [tensor])
    assert torch.equal(copied, tensor) and copied.data_ptr() != tensor.data_ptr()
    assert torch.equal(merge_group("passthrough", [tensor], scale=0.5), tensor * 0.5)
    with pytest.raises(ConfigError, match="merge_method 'passthrough' takes exactly 1 models"):
        merge_group("passthrough", [tensor, tensor])
