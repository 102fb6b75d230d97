"""AdamW whose moment estimates are stored in a low-precision dtype (BF16, as DeepSeek-V3 does).

The update itself runs in FP32 on FP32 master weights: each step loads the moments, updates them in
FP32, applies the decoupled weight decay and the bias-corrected step, then stores the moments back
in `moments_dtype`. With moments_dtype=float32 it computes what torch.optim.AdamW computes.
Halving the moments halves most of the optimizer state (2 x 4 bytes -> 2 x 2 bytes per parameter).
"""

from __future__ import annotations

import torch


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, no amsgrad) with moments in `moments_dtype`."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moments_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if moments_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"moments_dtype: must be float32, bfloat16 or float16, got {moments_dtype}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moments_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moments_dtype)
                state["step"] = t = int(state["step"]) + 1  # a checkpoint restores it as a tensor
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**t))
        return loss
