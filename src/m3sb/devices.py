"""Choosing the device that merges and evaluations compute on."""

from __future__ import annotations

import re

import torch

from m3sb.errors import ConfigError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(name: str) -> torch.device:
    """``auto`` (a GPU when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to exist."""
    if not _DEVICE.match(name):
        raise ConfigError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: no Apple GPU is available on this machine")
    return torch.device(name)
