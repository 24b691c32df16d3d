"""Boltzmann-generator layer around the EGNN vector field: prior, flow matching, sampling, reweighting."""

from tbg.flow.reweight import (
    clip_log_weights,
    kish_ess,
    log_importance_weights,
    normalized_weights,
    weighted_mean,
)

__all__ = [
    "clip_log_weights",
    "kish_ess",
    "log_importance_weights",
    "normalized_weights",
    "weighted_mean",
]
