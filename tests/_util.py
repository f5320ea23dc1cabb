"""Helpers the model tests share (test_integrations, test_runtime_dit, test_runtime_dcae)."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturb(model: torch.nn.Module, *, batch_norm_stats: bool = False) -> None:
    """Random norm weights and biases (transformers and diffusers initialise them to 1 / 0, which
    would let a wrong norm or bias go unnoticed); with ``batch_norm_stats``, random BatchNorm
    running means and variances too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        if not batch_norm_stats:
            return
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
