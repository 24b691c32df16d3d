"""docs/model.md's vector field written out densely, independent of tbg's edge-list reference."""
from __future__ import annotations

import torch
from torch.nn.functional import silu


def spec_velocity(state: dict[str, torch.Tensor], n_layers: int, features: torch.Tensor, t: float,
                  x: torch.Tensor, coords_range: float = 15.0) -> torch.Tensor:
    """docs/model.md written out densely for one molecule straight from a published-layout state dict
    (x [N, 3], features [N, F]); independent of tbg's edge-list reference."""
    def lin(name: str, inp: torch.Tensor) -> torch.Tensor:
        out = inp @ state[name + ".weight"].T
        return out + state[name + ".bias"] if name + ".bias" in state else out

    n = x.shape[0]
    h = lin("embedding", torch.cat([features, torch.full((n, 1), t, dtype=x.dtype)], 1))
    x0 = x
    a = ((x0[:, None] - x0[None]) ** 2).sum(-1)
    off_diag = 1.0 - torch.eye(n, dtype=x.dtype)
    for layer in range(n_layers):
        p = f"gcl_{layer}."
        d = x[:, None] - x[None]  # d[i, j] = x_i - x_j
        r = (d ** 2).sum(-1)
        hi, hj = h[:, None].expand(n, n, -1), h[None].expand(n, n, -1)
        m = silu(lin(p + "edge_mlp.2", silu(lin(p + "edge_mlp.0", torch.cat([hi, hj, r[..., None], a[..., None]], -1)))))
        m = m * torch.sigmoid(lin(p + "att_mlp.0", m))
        m = m * off_diag[..., None]
        phi = torch.tanh(lin(p + "coord_mlp.2", silu(lin(p + "coord_mlp.0", m)))) * (coords_range / n_layers)
        x = x + (d / (torch.sqrt(r + 1e-8) + 1)[..., None] * phi * off_diag[..., None]).sum(1)
        h = h + lin(p + "node_mlp.2", silu(lin(p + "node_mlp.0", torch.cat([h, m.sum(1)], -1))))
    v = x - x0
    return v - v.mean(0, keepdim=True)
