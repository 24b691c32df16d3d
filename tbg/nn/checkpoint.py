"""Checkpoints in the layout of the published TBG code, in both directions (docs/model.md, "Checkpoints").

A published checkpoint is ``{"model_state_dict": flow_state}``; the EGNN's tensors sit in the
flow state under ``PREFIX`` and, a second time, under ``INVERSE_PREFIX`` (the inverse direction
shares the network). We read that, a bare flow state dict, or a bare EGNN state dict, and write
the full published layout plus our own metadata under ``"tbg"``.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from tbg.errors import InputError
from tbg.nn.egnn import EGNN, Backend, BoundDynamics

PREFIX = "_dynamics._dynamics._dynamics_function.egnn."
INVERSE_PREFIX = "_inverse_dynamics._dynamics._dynamics._dynamics_function.egnn."

StateSource = str | os.PathLike | Mapping[str, Any]


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable, or not in the published TBG layout."""


def read_checkpoint(source: StateSource) -> dict[str, Any]:
    """The raw checkpoint dict from a path (never executing code: weights_only) or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which would run whatever the file holds: not repeated.
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt, or holding objects other than "
                              f"tensors and plain containers, which tbg refuses to load)") from err
    except Exception as err:  # noqa: BLE001 - truncated or foreign files fail in torch.load in many ways
        reason = " ".join(str(err).split())[:200]
        if "weights_only" in reason:  # never pass on advice to load the file unrestricted
            reason = "refused by the restricted loader"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt; "
                              f"{type(err).__name__}: {reason})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)


def egnn_state(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The EGNN's own state dict (keys like ``gcl_0.edge_mlp.0.weight``) from any accepted form."""
    state = checkpoint.get("model_state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise CheckpointError("'model_state_dict' is not a state dict")
    if any(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if "embedding.weight" in state:
        return {k: v for k, v in state.items() if isinstance(v, Tensor)}
    sample = ", ".join(list(state)[:5])
    raise CheckpointError(f"no EGNN weights found: expected keys under '{PREFIX}' (published flow), "
                          f"'model_state_dict', or a bare EGNN state dict; first keys are: {sample}")


def _shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"checkpoint is missing the key '{key}'")
    value = state[key]
    if not isinstance(value, Tensor):
        raise CheckpointError(f"'{key}' is a {type(value).__name__}, not a tensor")
    if not torch.is_floating_point(value) or not torch.isfinite(value).all():
        raise CheckpointError(f"'{key}' must hold finite floating-point values")
    return tuple(value.shape)


def infer_config(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """n_features, hidden, n_layers, attention and n_out_features from an EGNN state dict,
    checking every tensor's shape against them."""
    hidden, n_in = _shape(state, "embedding.weight")
    layer_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"gcl_(\d+)\.", k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise CheckpointError(f"expected layers gcl_0 ... gcl_(L-1), found {layer_ids}")
    attention = "gcl_0.att_mlp.0.weight" in state
    n_out = _shape(state, "embedding_out.weight")[0]
    H = hidden
    expected = {"embedding.weight": (H, n_in), "embedding.bias": (H,),
                "embedding_out.weight": (n_out, H), "embedding_out.bias": (n_out,)}
    for layer in layer_ids:
        p = f"gcl_{layer}."
        expected |= {p + "edge_mlp.0.weight": (H, 2 * H + 2), p + "edge_mlp.0.bias": (H,),
                     p + "edge_mlp.2.weight": (H, H), p + "edge_mlp.2.bias": (H,),
                     p + "node_mlp.0.weight": (H, 2 * H), p + "node_mlp.0.bias": (H,),
                     p + "node_mlp.2.weight": (H, H), p + "node_mlp.2.bias": (H,),
                     p + "coord_mlp.0.weight": (H, H), p + "coord_mlp.0.bias": (H,),
                     p + "coord_mlp.2.weight": (1, H)}
        if attention:
            expected |= {p + "att_mlp.0.weight": (1, H), p + "att_mlp.0.bias": (1,)}
    for key, shape in expected.items():
        got = _shape(state, key)
        if got != shape:
            raise CheckpointError(f"'{key}' has shape {list(got)}, expected {list(shape)} for hidden size "
                                  f"{H} (from embedding.weight {[H, n_in]})")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected keys in the EGNN state: {', '.join(unexpected[:5])}")
    return {"n_features": n_in - 1, "hidden": H, "n_layers": len(layer_ids), "attention": attention,
            "n_out_features": n_out}


def load_egnn(source: StateSource, *, tanh: bool = True, coords_range: float = 15.0) -> EGNN:
    """An ``EGNN`` with the weights of a published (or our own) checkpoint, on the CPU in float32
    (or the checkpoint's dtype). tanh and coords_range are not stored in published checkpoints;
    the defaults are the published values."""
    checkpoint = read_checkpoint(source)
    state = egnn_state(checkpoint)
    meta = checkpoint.get("tbg", {})
    config = infer_config(state)
    egnn = EGNN(**config, tanh=meta.get("tanh", tanh), coords_range=meta.get("coords_range", coords_range))
    egnn = egnn.to(state["embedding.weight"].dtype)
    egnn.load_state_dict(state)
    return egnn


def load_published(source: StateSource, features: Tensor, *, node_mask: Tensor | None = None,
                   mol_ptr: Tensor | None = None, backend: Backend = "auto", tanh: bool = True,
                   coords_range: float = 15.0) -> BoundDynamics:
    """The published TBG vector field ``dyn(t, x)`` for the molecules encoded by ``features``.

    source: a checkpoint path (loaded with weights_only=True) or a state dict, published layout
    or ours. features: [N, F] for one molecule (x of shape [B, 3N] or [B, N, 3]); [B, N, F] with
    node_mask [B, N] for a padded batch; [M, F] with mol_ptr for a ragged batch. Parameters
    follow features' device and dtype.
    """
    egnn = load_egnn(source, tanh=tanh, coords_range=coords_range)
    layouts = "[N, F] (one molecule, or ragged with mol_ptr) or [B, N, F] (a batch, padded with node_mask)"
    if not torch.is_floating_point(features) or features.dim() not in (2, 3) or (
            mol_ptr is not None and features.dim() != 2):
        raise ValueError(f"features must be a floating-point tensor {layouts}, got {features.dtype} "
                         f"{tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    if features.shape[-1] != egnn.n_features:
        raise ValueError(f"features have {features.shape[-1]} columns but the checkpoint's embedding expects "
                         f"{egnn.n_features} (+1 for time)")
    egnn = egnn.to(device=features.device, dtype=features.dtype)
    return BoundDynamics(egnn, features, node_mask=node_mask, mol_ptr=mol_ptr, backend=backend)


def published_state_dict(egnn: EGNN) -> dict[str, Tensor]:
    """The flow state dict of the published code: the EGNN under both prefixes."""
    state = {k: v.detach().cpu() for k, v in egnn.state_dict().items()}
    return {**{PREFIX + k: v for k, v in state.items()}, **{INVERSE_PREFIX + k: v for k, v in state.items()}}


def save_published(path: str | os.PathLike, egnn: EGNN, **extra: Any) -> None:
    """Write ``egnn`` in the published checkpoint layout (readable by the published code), with
    ``extra`` entries (optimizer state, step ...) and our model options under ``"tbg"``.
    The file is written to a temporary name and renamed, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"tanh": egnn.tanh, "coords_range": egnn.coords_range, "version": 1, **extra.pop("tbg", {})}
    checkpoint = {"model_state_dict": published_state_dict(egnn), **extra, "tbg": meta}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
