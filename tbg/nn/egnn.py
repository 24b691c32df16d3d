"""The TBG vector field (docs/model.md): EGNN dynamics with the published parameter layout, two backends.

``EGNN`` holds the parameters under exactly the names of the published code (``embedding``,
``gcl_{l}.edge_mlp.0`` ...), so a published state dict loads without renaming. Its forward
runs either the plain-PyTorch reference (``tbg.nn.reference``) or the fused ops
(``tbg.nn.ops``) on the same parameters; ``backend="auto"`` picks the fused ops when they
are built for the tensors' device. ``EGNN.divergence`` chooses among the fused ops, their torch
implementation (``tbg.nn.divergence_torch``, differentiable) and the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tbg._library import build_info, has_kernel
from tbg.nn import divergence_torch, ops, reference
from tbg.nn.hutchinson import Probe, hutchinson_trace, probes
from tbg.nn.layout import check_mol_ptr, molecule_index, ragged_edges, to_ragged
from tbg.nn.spec import STACKED_WEIGHTS, StackedWeight

Backend = Literal["auto", "reference", "fused"]
Method = Literal["exact", "hutchinson"]
# Paths of the stacked parameters inside an EGCL, for plain attribute access: get_parameter would reject
# the plain tensors torch.func.functional_call swaps in, and torch.compile cannot trace operator.attrgetter.
_PARAMETER_PATHS = tuple(tuple(w.parameter.split(".")) for w in STACKED_WEIGHTS)


class EGCL(nn.Module):
    """One E(n)-equivariant graph convolution layer: parameters only (the math lives in the
    reference and the kernels). Submodule names and indices follow the published code."""

    def __init__(self, hidden: int, attention: bool = True, tanh: bool = True) -> None:
        super().__init__()
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        coord = [nn.Linear(hidden, hidden), nn.SiLU(), last] + ([nn.Tanh()] if tanh else [])
        self.coord_mlp = nn.Sequential(*coord)
        self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None


@dataclass
class _Flat:
    """A batch in flat-atom form, for the reference: the layout's atoms (padding included)."""

    x: Tensor  # [M, 3]
    features: Tensor  # [M, F]
    t: Tensor  # [M, 1]
    mol_ptr: Tensor  # [B + 1]
    node_mask: Tensor | None  # [M, 1]


class EGNN(nn.Module):
    """EGNN dynamics v(t, x) of the published TBG models.

    Args:
        n_features: width F of the per-atom encoding (the time column is appended to it).
        hidden: hidden size H.  n_layers: number of E_GCL layers L.
        attention, tanh: as in the published code (both True in the published models).
        coords_range: total coordinate range; each layer uses coords_range / n_layers.
        n_out_features: output width of the (unused) ``embedding_out`` layer, F + 1 by default.
    """

    def __init__(self, n_features: int, hidden: int = 64, n_layers: int = 5, *, attention: bool = True,
                 tanh: bool = True, coords_range: float = 15.0, n_out_features: int | None = None) -> None:
        super().__init__()
        if n_features < 0 or hidden < 1 or n_layers < 1:
            raise ValueError(f"need n_features >= 0, hidden >= 1, n_layers >= 1; got {n_features}, "
                             f"{hidden}, {n_layers}")
        self.n_features, self.hidden, self.n_layers = n_features, hidden, n_layers
        self.attention, self.tanh, self.coords_range = attention, tanh, float(coords_range)
        self.embedding = nn.Linear(n_features + 1, hidden)
        self.embedding_out = nn.Linear(hidden, n_out_features or n_features + 1)
        for layer in range(n_layers):
            self.add_module(f"gcl_{layer}", EGCL(hidden, attention, tanh))

    @property
    def layers(self) -> list[EGCL]:
        return [getattr(self, f"gcl_{layer}") for layer in range(self.n_layers)]

    @property
    def layer_range(self) -> float:
        return self.coords_range / self.n_layers

    def extra_repr(self) -> str:
        return (f"n_features={self.n_features}, hidden={self.hidden}, n_layers={self.n_layers}, "
                f"attention={self.attention}, tanh={self.tanh}, coords_range={self.coords_range}")

    # ---- the two backends -------------------------------------------------------------------
    def fused_available(self, device: torch.device | str) -> bool:
        """Whether the fused ops can run this model on ``device``."""
        return self.attention and self.tanh and has_kernel("egnn_forward", device)

    def resolve_backend(self, backend: Backend, device: torch.device | str) -> Literal["reference", "fused"]:
        if backend == "reference":
            return "reference"
        fused = self.fused_available(device)
        if backend == "fused" and not fused:
            why = ("the fused ops implement the published options attention=True, tanh=True"
                   if not (self.attention and self.tanh) else
                   f"tbg's native library has no kernel for {torch.device(device).type} "
                   f"(built with CUDA: {build_info()['cuda'] or 'no'})")
            raise RuntimeError(f"backend='fused' is not available: {why}")
        if backend not in ("auto", "fused"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'fused', got {backend!r}")
        return "fused" if fused else "reference"

    def stacked_weights(self) -> tuple[Tensor, ...]:
        """The 13 per-layer weights stacked over layers, in the order of the ops' schemas
        (``tbg.nn.spec.STACKED_WEIGHTS``)."""
        layers = self.layers

        def parameter(gcl: nn.Module, path: tuple[str, ...]) -> Tensor:
            for name in path:
                gcl = getattr(gcl, name)
            return gcl

        def stacked(w: StackedWeight, path: tuple[str, ...]) -> Tensor:
            per_layer = [parameter(gcl, path) for gcl in layers]
            return torch.stack([p[0] if w.first_row else p for p in per_layer]).contiguous()

        return tuple(stacked(w, path) for w, path in zip(STACKED_WEIGHTS, _PARAMETER_PATHS))

    def embed(self, t_atoms: Tensor, features: Tensor) -> Tensor:
        """h0 = embedding([features, t]) per atom; t_atoms [M, 1], features [M, F]."""
        return self.embedding(torch.cat([features, t_atoms], dim=1))

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, t: Tensor | float, x: Tensor, features: Tensor, *, node_mask: Tensor | None = None,
                mol_ptr: Tensor | None = None, backend: Backend = "auto") -> Tensor:
        """Vector field v(t, x), the same shape as x.

        Layouts: fixed x [B, N, 3] with features [N, F] or [B, N, F]; padded, the same with
        node_mask [B, N]; ragged x [M, 3] with features [M, F] and mol_ptr [B + 1].
        t: a number, [B] or [B, 1].
        """
        t = self._check_inputs(t, x, features, node_mask, mol_ptr)
        if self.resolve_backend(backend, x.device) == "fused":
            view, x_r, features_r, mol_ptr_r = to_ragged(x, features, node_mask, mol_ptr)
            t_atoms = t[molecule_index(mol_ptr_r)].unsqueeze(1)
            v = ops.egnn_velocity(x_r, self.embed(t_atoms, features_r), mol_ptr_r,
                                  self.stacked_weights(), self.layer_range)
            return v if view is None else view.scatter(v)
        flat = self._flat(t, x, features, node_mask, mol_ptr)
        v = self._reference_velocity(flat)
        return v if mol_ptr is not None else v.reshape(x.shape)

    def divergence(self, t: Tensor | float, x: Tensor, features: Tensor, *, node_mask: Tensor | None = None,
                   mol_ptr: Tensor | None = None, method: Method = "exact", n_probes: int = 1,
                   probe: Probe = "rademacher", generator: torch.Generator | None = None,
                   backend: Backend = "auto", tangent_chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """(v, div): the field as ``forward`` and div [B] = tr(dv/dx) per molecule.

        method "exact" (3 n_b unit tangents per molecule, ``tangent_chunk`` at a time) or
        "hutchinson" (``n_probes`` random probes, "rademacher" or "gaussian", drawn from
        ``generator``: unbiased). Padded atoms take no part. The fused ops have no gradient: with
        grad mode on and parameters (or x) requiring grad a differentiable path runs (the torch
        implementation of the same algorithm, or the reference for ``backend="reference"`` and
        models the fused ops do not cover), slower and holding activations for the backward pass,
        so call under ``torch.no_grad()`` when no gradient is needed.
        """
        t = self._check_inputs(t, x, features, node_mask, mol_ptr)
        if method not in ("exact", "hutchinson"):
            raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
        if tangent_chunk is not None and tangent_chunk < 1:
            raise ValueError(f"tangent_chunk must be >= 1, got {tangent_chunk}")
        view, x_r, features_r, ptr = to_ragged(x, features, node_mask, mol_ptr)
        h0 = self.embed(t[molecule_index(ptr)].unsqueeze(1), features_r)
        # The fused ops have no autograd. When a gradient of div is wanted (training through the
        # likelihood), models the fused ops support take the torch implementation of the same
        # algorithm with autograd through it, the others (and backend='reference') the reference;
        # both are differentiable w.r.t. x, t, features and parameters.
        needs_grad = torch.is_grad_enabled() and (h0.requires_grad or x_r.requires_grad)
        op = "egnn_divergence" if method == "exact" else "egnn_jvp"
        resolved = self.resolve_backend(backend, x.device) if backend != "reference" else "reference"
        fused = resolved == "fused" and has_kernel(op, x.device) and not needs_grad
        differentiable = resolved == "fused" and needs_grad
        if backend == "fused" and not fused:
            why = ("gradients are required and the fused op has none" if needs_grad
                   else f"no {op} kernel for {x.device.type}")
            raise RuntimeError(f"backend='fused' cannot compute this divergence: {why}; use backend='auto' or "
                               f"'reference'")
        weights = self.stacked_weights() if fused or differentiable else ()
        if method == "hutchinson":
            eps = probes(n_probes, x_r, probe, generator)
            if fused:
                jvp_fn = lambda e: ops.egnn_jvp(x_r, h0, ptr, weights, e, self.layer_range)  # noqa: E731
            elif differentiable:
                jvp_fn = lambda e: divergence_torch.jvp(x_r, h0, ptr, weights, e, self.layer_range)  # noqa: E731
            else:
                field = reference.egnn_field(self, h0, ptr)
                jvp_fn = lambda e: reference.field_jvp(field, x_r, e)  # noqa: E731
            v, div = hutchinson_trace(jvp_fn, eps, ptr)
        elif fused:
            v, div = ops.egnn_divergence(x_r, h0, ptr, weights, self.layer_range, tangent_chunk)
        elif differentiable:
            chunk = tangent_chunk or divergence_torch.default_tangent_chunk(ptr, self.hidden)
            v, div = divergence_torch.divergence(x_r, h0, ptr, weights, self.layer_range, chunk)
        else:
            v, div = reference.divergence_vmap_jvp(reference.egnn_field(self, h0, ptr), x_r, ptr, tangent_chunk)
        return (v if view is None else view.scatter(v)), div

    def _reference_velocity(self, flat: _Flat) -> Tensor:
        row, col = ragged_edges(flat.mol_ptr)
        edge_mask = None if flat.node_mask is None else flat.node_mask[row] * flat.node_mask[col]
        h0 = self.embed(flat.t, flat.features)
        dx = reference.egnn_displacement(self, h0, flat.x, row, col, edge_mask, flat.node_mask)
        return reference.remove_mean(dx, flat.mol_ptr, flat.node_mask)

    # ---- layouts -----------------------------------------------------------------------------
    def _check_inputs(self, t: Tensor | float, x: Tensor, features: Tensor, node_mask: Tensor | None,
                      mol_ptr: Tensor | None) -> Tensor:
        """Validate shapes, dtypes, devices and values; return t as [B]."""
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if features.dtype != x.dtype or features.device != x.device:
            raise TypeError(f"features ({features.dtype}, {features.device}) must match x "
                            f"({x.dtype}, {x.device}); convert with features.to(x)")
        if self.embedding.weight.dtype != x.dtype or self.embedding.weight.device != x.device:
            raise TypeError(f"model parameters are {self.embedding.weight.dtype} on "
                            f"{self.embedding.weight.device} but x is {x.dtype} on {x.device}; "
                            f"use model.to(x)")
        if features.shape[-1] != self.n_features:
            raise ValueError(f"features have {features.shape[-1]} columns but the model expects "
                             f"n_features = {self.n_features}")
        if mol_ptr is not None:
            if x.dim() != 2 or x.shape[1] != 3:
                raise ValueError(f"ragged layout: x must be [M, 3], got {tuple(x.shape)}")
            if features.shape[:-1] != x.shape[:1]:
                raise ValueError(f"ragged layout: features must be [M, F] with M = {x.shape[0]}, got "
                                 f"{tuple(features.shape)}")
            if node_mask is not None:
                raise ValueError("give either node_mask (padded layout) or mol_ptr (ragged), not both")
            check_mol_ptr(mol_ptr, x.shape[0])
            n_mol = mol_ptr.numel() - 1
        else:
            if x.dim() != 3 or x.shape[2] != 3:
                raise ValueError(f"x must be [B, N, 3] (or ragged [M, 3] with mol_ptr), got {tuple(x.shape)}")
            n_mol, n_atoms = x.shape[:2]
            if features.shape[-2] != n_atoms or features.dim() not in (2, 3) or (
                    features.dim() == 3 and features.shape[0] != n_mol):
                raise ValueError(f"features must be [N, F] or [B, N, F] with B = {n_mol}, N = {n_atoms}, "
                                 f"got {tuple(features.shape)}")
            if node_mask is not None and tuple(node_mask.shape) != (n_mol, n_atoms):
                raise ValueError(f"node_mask must be [B, N] = {(n_mol, n_atoms)}, got {tuple(node_mask.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite coordinates")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if not torch.isfinite(t).all():
            raise ValueError("t contains NaN or infinite values")
        if t.dim() == 0:
            t = t.expand(n_mol)
        elif t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.shape != (n_mol,):
            raise ValueError(f"t must be a number, [B] or [B, 1] with B = {n_mol}, got {tuple(t.shape)}")
        return t

    def _flat(self, t: Tensor, x: Tensor, features: Tensor, node_mask: Tensor | None,
              mol_ptr: Tensor | None) -> _Flat:
        if mol_ptr is not None:
            return _Flat(x, features, t[molecule_index(mol_ptr)].unsqueeze(1), mol_ptr, None)
        n_mol, n_atoms = x.shape[:2]
        mask = None if node_mask is None else node_mask.reshape(-1, 1).to(x.dtype)
        return _Flat(x.reshape(-1, 3), features.expand(n_mol, n_atoms, -1).reshape(n_mol * n_atoms, self.n_features),
                     t.repeat_interleave(n_atoms).unsqueeze(1),
                     torch.arange(n_mol + 1, device=x.device) * n_atoms, mask)


class BoundDynamics(nn.Module):
    """An EGNN bound to the molecules it describes: ``dyn(t, x)`` as in the published flows.

    features [N, F]: one molecule, x [B, 3N] or [B, N, 3], any B.
    features [B, N, F] with optional node_mask [B, N]: padded transfer batch of B molecules.
    features [M, F] with mol_ptr [B + 1]: ragged batch, x [M, 3].
    ``divergence_options`` are default keyword arguments of ``divergence`` (e.g. method="hutchinson",
    n_probes, generator), so code that calls ``dyn.divergence(t, x)`` (the ODE solvers) uses them.
    """

    def __init__(self, egnn: EGNN, features: Tensor, *, node_mask: Tensor | None = None,
                 mol_ptr: Tensor | None = None, backend: Backend = "auto",
                 divergence_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.egnn = egnn
        self.backend: Backend = backend
        self.divergence_options: dict[str, Any] = dict(divergence_options or {})
        self.register_buffer("features", features, persistent=False)
        self.register_buffer("node_mask", node_mask, persistent=False)
        self.register_buffer("mol_ptr", mol_ptr, persistent=False)

    @property
    def n_atoms(self) -> int:
        return self.features.shape[-2] if self.mol_ptr is None else self.features.shape[0]

    def _dense(self, x: Tensor) -> Tensor:
        if self.mol_ptr is not None:
            return x
        if x.dim() == 2 and x.shape[1] == 3 * self.n_atoms:
            return x.reshape(x.shape[0], self.n_atoms, 3)
        if x.dim() == 3 and x.shape[1:] == (self.n_atoms, 3):
            return x
        raise ValueError(f"x must be [B, {3 * self.n_atoms}] or [B, {self.n_atoms}, 3] for this molecule, "
                         f"got {tuple(x.shape)}")

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        v = self.egnn(t, self._dense(x), self.features, node_mask=self.node_mask, mol_ptr=self.mol_ptr,
                      backend=self.backend)
        return v.reshape(x.shape)

    def divergence(self, t: Tensor | float, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        """(v, div [B]) with v shaped like x; keyword arguments as ``EGNN.divergence``, by default the
        ``divergence_options`` and the backend of this dynamics."""
        kwargs = {"backend": self.backend, **self.divergence_options, **kwargs}
        v, div = self.egnn.divergence(t, self._dense(x), self.features, node_mask=self.node_mask,
                                      mol_ptr=self.mol_ptr, **kwargs)
        return v.reshape(x.shape), div
