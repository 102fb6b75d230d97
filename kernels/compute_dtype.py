"""Which dtype a layer computes in: the autocast dtype when autocast is on, else the input's.

Master weights stay FP32 parameters; the precision policy turns on autocast (bf16) around the model,
and the custom autograd functions here read it once and then run with autocast off, so that their
own FP32 arithmetic (scales, reference GEMMs of the torch twins) is not silently cast to bf16.
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)
