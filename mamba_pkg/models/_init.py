"""Parameter initialisation shared by the Mamba mixers."""

from __future__ import annotations

import math

import torch


def inverse_softplus_dt(n, dt_min, dt_max, dt_init_floor, **factory_kwargs):
    """(n,) values whose softplus is log-uniform in [dt_min, dt_max] (floored at dt_init_floor)."""
    dt = torch.exp(torch.rand(n, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
    return dt + torch.log(-torch.expm1(-dt))
