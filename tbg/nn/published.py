"""The published TBG code's dynamics objects on tbg's engine: a drop-in divergence estimator.

The published sampling scripts wrap their EGNN dynamics in bgflow's ``BlackBoxDynamics`` with a
brute-force divergence estimator (one backward pass per coordinate, 3N passes per step).
``ExactDivergenceEstimator`` has bgflow's estimator calling convention,
``estimator(dynamics, t, xs) -> (dxs, -div)`` with xs and dxs [B, D] and div [B, 1], so it replaces
that estimator in a published script by one assignment::

    bb_dynamics._divergence_estimator = tbg.nn.ExactDivergenceEstimator()

It recognises the published dynamics by their attribute layout (no import of the published code):

* single molecule (alanine dipeptide, ``EGNN_dynamics_AD2_cat``): the network as ``egnn``, the
  one-hot features as ``h_initial`` [N, F] (time appended as one more feature), the edge list of
  the complete graph as ``edges``;
* padded transferable model (the sampling script's ``NetDynamicsWrapper`` around
  ``EGNN_dynamics_transferable_MD``): ``net_dynamics.egnn``, ``h_initial`` [1, N_max, F],
  ``node_mask`` [1, N_max] and ``edge_mask`` [1, N_max, N_max] (all real pairs i != j).

For a recognised object it builds an ``EGNN`` that shares the published network's parameters
(the same tensors: later training or ``load_state_dict`` on the published flow is seen), checks on
the first call that its field equals the dynamics' own output, and from then on returns
``EGNN.divergence`` (fused kernels where built; differentiable when autograd records, as the
adjoint method needs). Anything else (other network options, custom edges, a changed forward, a
mismatch) falls back to the brute-force divergence, with one warning per dynamics object.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from tbg.nn.egnn import EGNN
from tbg.nn.reference import divergence_bruteforce

log = logging.getLogger("tbg")

Dynamics = Callable[[Tensor, Tensor], Tensor]


class NotRecognised(Exception):
    """The object is not a published EGNN dynamics tbg can run; the message says why."""


def egnn_sharing_parameters(published: nn.Module) -> EGNN:
    """An ``EGNN`` whose parameters are those of a published EGNN network (the same tensors).

    Accepts the published options tbg implements: attention, tanh coordinate head, residual node
    update, sum aggregation, one coordinate range for all layers. Raises NotRecognised otherwise.
    """
    try:
        n_layers, embedding = int(published.n_layers), published.embedding
        layers = [getattr(published, f"gcl_{layer}") for layer in range(n_layers)]
        layer_range = float(published.coords_range_layer)
    except AttributeError as err:
        raise NotRecognised(f"not a published EGNN network ({err})") from err
    names = ("attention", "tanh", "recurrent", "agg_type", "coords_range")
    options = [tuple(getattr(gcl, name, None) for name in names) for gcl in layers]
    if any(option != (True, True, True, "sum", layer_range) for option in options):
        raise NotRecognised(f"network options (attention, tanh, recurrent, aggregation, range) per layer are "
                            f"{options}; tbg implements (True, True, True, 'sum', {layer_range}) in every layer")
    with torch.device("meta"):
        egnn = EGNN(embedding.in_features - 1, embedding.out_features, n_layers, coords_range=layer_range * n_layers,
                    n_out_features=published.embedding_out.out_features)
    theirs = dict(published.named_parameters())
    ours = dict(egnn.named_parameters())
    if theirs.keys() != ours.keys() or any(theirs[k].shape != ours[k].shape for k in ours):
        raise NotRecognised(f"parameters differ from the published layout: {sorted(theirs.keys() ^ ours.keys())} "
                            f"or shapes")
    for name, parameter in theirs.items():
        module, _, leaf = name.rpartition(".")
        setattr(egnn.get_submodule(module), leaf, parameter)
    return egnn


@dataclass
class _Engine:
    """A recognised dynamics object as tbg inputs: the shared EGNN, per-atom features [N, F] and,
    for padded models, the real-atom mask [N]."""

    egnn: EGNN
    features: Tensor
    node_mask: Tensor | None

    def divergence(self, t: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        """(dxs [B, D], div [B]) for xs [B, D = 3 N]."""
        n_atoms = self.features.shape[0]
        if xs.dim() != 2 or xs.shape[1] != 3 * n_atoms:
            raise ValueError(f"xs must be [B, {3 * n_atoms}] for these dynamics, got {tuple(xs.shape)}")
        if self.features.dtype != xs.dtype or self.features.device != xs.device:
            self.features = self.features.to(xs)
        mask = None
        if self.node_mask is not None:
            self.node_mask = self.node_mask.to(xs.device)
            mask = self.node_mask.expand(xs.shape[0], n_atoms)
        v, div = self.egnn.divergence(t, xs.reshape(xs.shape[0], n_atoms, 3), self.features, node_mask=mask)
        return v.reshape(xs.shape), div


def _is_complete_graph(edges: object, n_atoms: int) -> bool:
    """Whether a published edge list [rows, cols] holds every ordered pair i != j once."""
    try:
        rows, cols = (torch.as_tensor(e).reshape(-1).tolist() for e in edges)
    except (TypeError, ValueError):
        return False
    pairs = list(zip(rows, cols))
    return len(pairs) == n_atoms * (n_atoms - 1) and set(pairs) == {
        (i, j) for i in range(n_atoms) for j in range(n_atoms) if i != j}


def _check_time_conditioned(dynamics: nn.Module) -> None:
    if not getattr(dynamics, "condition_time", False) or getattr(dynamics, "mode", "egnn_dynamics") != "egnn_dynamics":
        raise NotRecognised("the dynamics are not the time-conditioned EGNN ('egnn_dynamics' with condition_time)")


def _engine_for(dynamics: object) -> _Engine:
    """tbg inputs for a published dynamics object; raises NotRecognised."""
    if hasattr(dynamics, "net_dynamics"):  # the transferable model's sampling wrapper (padded)
        net = dynamics.net_dynamics
        _check_time_conditioned(net)
        try:
            features, mask, edge_mask = dynamics.h_initial, dynamics.node_mask, dynamics.edge_mask
        except AttributeError as err:
            raise NotRecognised(f"padded dynamics without h_initial, node_mask or edge_mask ({err})") from err
        features, mask = features.reshape(-1, features.shape[-1]), mask.reshape(-1)
        n_max = mask.numel()
        real = mask != 0
        expected = real[:, None] & real[None, :] & ~torch.eye(n_max, dtype=torch.bool, device=real.device)
        if features.shape[0] != n_max or edge_mask.numel() != n_max * n_max or not torch.equal(
                edge_mask.reshape(n_max, n_max) != 0, expected):
            raise NotRecognised("the edge mask is not 'every real pair i != j' or the masks and features disagree")
        return _Engine(egnn_sharing_parameters(net.egnn), features, real)
    if hasattr(dynamics, "egnn") and hasattr(dynamics, "h_initial"):  # single molecule
        _check_time_conditioned(dynamics)
        features = dynamics.h_initial
        if features.dim() != 2:
            raise NotRecognised(f"h_initial must be [N, F], got {tuple(features.shape)}")
        if not _is_complete_graph(getattr(dynamics, "edges", None), features.shape[0]):
            raise NotRecognised("the edges are not the complete graph of the molecule")
        return _Engine(egnn_sharing_parameters(dynamics.egnn), features, None)
    raise NotRecognised(f"{type(dynamics).__name__} has neither the single-molecule (egnn, h_initial) nor the "
                        f"padded (net_dynamics, h_initial, node_mask, edge_mask) layout of the published dynamics")


def bruteforce_divergence(dynamics: Dynamics, t: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """(dxs [B, D], div [B]) by one backward pass per coordinate, as the published estimator;
    differentiable when autograd records. D must be a multiple of 3 (atoms in 3-d)."""
    n_batch, dim = xs.shape
    if dim % 3:
        raise ValueError(f"xs must hold 3-d coordinates, [B, 3N], got {tuple(xs.shape)}")
    n_atoms = dim // 3
    ptr = torch.arange(n_batch + 1, device=xs.device) * n_atoms

    def field(y: Tensor) -> Tensor:
        return dynamics(t, y.reshape(n_batch, dim)).reshape(n_batch * n_atoms, 3)

    v, div = divergence_bruteforce(field, xs.reshape(n_batch * n_atoms, 3), ptr,
                                   create_graph=torch.is_grad_enabled())
    return v.reshape(n_batch, dim), div


class ExactDivergenceEstimator(nn.Module):
    """bgflow's divergence-estimator convention with tbg's exact divergence; see the module doc.

    ``estimator(dynamics, t, xs) -> (dxs, -div)``: xs [B, D], dxs [B, D], div [B, 1].
    ``verify_atol``: the first call on a dynamics object compares tbg's field with the object's own
    output and falls back to the brute force unless they agree to ``verify_atol`` x max |dxs|.
    Holds no parameters or buffers (a flow's state dict does not change when it is swapped in).
    """

    def __init__(self, verify_atol: float = 1e-4) -> None:
        super().__init__()
        self.verify_atol = verify_atol
        self._engines: weakref.WeakKeyDictionary[object, _Engine | str] = weakref.WeakKeyDictionary()

    def forward(self, dynamics: Dynamics, t: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        engine = self._engines.get(dynamics)
        if engine is None and xs.shape[0] == 0:  # nothing to check the field on yet
            engine = "empty batch"
        elif engine is None:
            engine = self._engines[dynamics] = self._recognise(dynamics, t, xs)  # modules, functions: weakref-able
        if isinstance(engine, str):
            dxs, div = bruteforce_divergence(dynamics, t, xs)
        else:
            dxs, div = engine.divergence(t, xs)
        return dxs, -div.reshape(-1, 1)

    def uses_engine(self, dynamics: object) -> bool:
        """Whether calls with ``dynamics`` run on tbg's engine (False: not seen yet, or brute force)."""
        return isinstance(self._engines.get(dynamics), _Engine)

    def _recognise(self, dynamics: Dynamics, t: Tensor, xs: Tensor) -> _Engine | str:
        """The engine for ``dynamics``, or why the brute force runs instead (warned once)."""
        try:
            engine = _engine_for(dynamics)
            with torch.no_grad():
                theirs = dynamics(t, xs)
                ours, _ = engine.divergence(t, xs)
                scale = theirs.abs().max().item()
                error = (ours - theirs).abs().max().item()
            if not error <= self.verify_atol * scale:
                raise NotRecognised(f"tbg's field differs from the dynamics' own output by {error:.3g} "
                                    f"(max |dxs| = {scale:.3g})")
        except (NotRecognised, TypeError, ValueError, RuntimeError) as err:
            why = f"{type(dynamics).__name__}: {err}"
            warnings.warn(f"ExactDivergenceEstimator falls back to the brute-force divergence (one backward pass "
                          f"per coordinate) for {why}", stacklevel=3)
            return why
        log.info("ExactDivergenceEstimator: %s runs on tbg's engine (%s)", type(dynamics).__name__,
                 "padded" if engine.node_mask is not None else "single molecule")
        return engine
