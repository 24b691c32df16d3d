"""Hutchinson's stochastic trace estimator on a ragged batch: tr(J) ~ mean_k eps_k^T J eps_k.

Works with any Jacobian-vector product: the fused op (``tbg.nn.ops.egnn_jvp``), its torch
implementation (``tbg.nn.divergence_torch.jvp``) or the reference (``tbg.nn.reference.field_jvp``).
Probes need not be mean-free (see ``tbg.nn.reference``).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from tbg.nn.layout import per_molecule_sum

Probe = Literal["rademacher", "gaussian"]


def probes(n_probes: int, like: Tensor, probe: Probe = "rademacher",
           generator: torch.Generator | None = None) -> Tensor:
    """K probes [K, M, 3] with E[eps eps^T] = I: Rademacher (+-1) or standard Gaussian."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got {n_probes}")
    shape = (n_probes, *like.shape)
    if probe == "gaussian":
        return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)
    if probe == "rademacher":
        bits = torch.randint(0, 2, shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")


def hutchinson_trace(jvp_fn: Callable[[Tensor], tuple[Tensor, Tensor]], eps: Tensor,
                     mol_ptr: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased trace estimate mean_k eps_k^T J eps_k per molecule; jvp_fn(eps) -> (v, J eps)."""
    v, jvp = jvp_fn(eps)
    return v, per_molecule_sum((eps * jvp).sum((0, 2)), mol_ptr) / eps.shape[0]
