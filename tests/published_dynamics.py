"""Stand-ins for the published TBG dynamics objects, for testing tbg.nn.published without bgflow or the
published code: the same class names, attribute layout (state-dict keys included), calling conventions
and forward semantics (docs/model.md), written densely here ([B, N, N] edge tensors with masks).

- ``EGNN_dynamics_AD2_cat(t, xs)``: one molecule, xs [B, 3N]; features ``h_initial`` [N, F] with t
  appended; ``edges`` the complete graph as [rows, cols].
- ``EGNN_dynamics_transferable_MD(t, xs, h, node_mask, edge_mask)``: padded batch, xs [B, 3 N_max],
  h [B, N_max, F], node_mask [B, N_max], edge_mask [B, N_max, N_max].
- ``NetDynamicsWrapper(t, xs)``: the transferable sampling script's binding of one molecule's
  features and masks (``h_initial`` [1, N_max, F], ``node_mask`` [1, N_max], ``edge_mask`` [1, N_max, N_max]).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# ruff: noqa: N801 - the published class names


class PublishedEGCL(nn.Module):
    """One published E_GCL layer (submodule names and attributes as published), dense forward."""

    def __init__(self, hidden: int, coords_range: float, attention: bool = True, tanh: bool = True) -> None:
        super().__init__()
        self.attention, self.tanh, self.recurrent, self.agg_type = attention, tanh, True, "sum"
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                      nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        head = [nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False)]
        if tanh:
            head.append(nn.Tanh())
            self.coords_range = coords_range
        self.coord_mlp = nn.Sequential(*head)
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, h: Tensor, x: Tensor, a: Tensor, node_mask: Tensor, edge_mask: Tensor) -> tuple[Tensor, Tensor]:
        """h [B, N, H], x [B, N, 3], a [B, N, N, 1], node_mask [B, N, 1], edge_mask [B, N, N, 1]."""
        n = x.shape[1]
        d = x[:, :, None] - x[:, None, :]  # x_i - x_j
        r = d.square().sum(-1, keepdim=True)
        pair = torch.cat([h[:, :, None].expand(-1, -1, n, -1), h[:, None].expand(-1, n, -1, -1), r, a], -1)
        m = self.edge_mlp(pair)
        if self.attention:
            m = m * self.att_mlp(m)
        m = m * edge_mask
        weight = self.coord_mlp(m) * (self.coords_range if self.tanh else 1.0)
        x = x + (d / (torch.sqrt(r + 1e-8) + 1) * weight * edge_mask).sum(2)
        h = h + self.node_mlp(torch.cat([h, m.sum(2)], -1))
        return h * node_mask, x * node_mask


class PublishedEGNN(nn.Module):
    """The published EGNN network: ``embedding``, ``embedding_out``, ``gcl_{l}``."""

    def __init__(self, in_features: int, hidden: int, n_layers: int, attention: bool = True, tanh: bool = True,
                 coords_range: float = 15.0) -> None:
        super().__init__()
        self.n_layers, self.hidden_nf = n_layers, hidden
        self.coords_range_layer = float(coords_range) / n_layers
        self.embedding = nn.Linear(in_features, hidden)
        self.embedding_out = nn.Linear(hidden, in_features)
        for layer in range(n_layers):
            self.add_module(f"gcl_{layer}", PublishedEGCL(hidden, self.coords_range_layer, attention, tanh))

    def forward(self, features: Tensor, x: Tensor, node_mask: Tensor, edge_mask: Tensor) -> Tensor:
        """x after the last layer, [B, N, 3], for features [B, N, F] and x [B, N, 3]."""
        a = (x[:, :, None] - x[:, None, :]).square().sum(-1, keepdim=True)
        h = self.embedding(features)
        for layer in range(self.n_layers):
            h, x = getattr(self, f"gcl_{layer}")(h, x, a, node_mask, edge_mask)
        return x


def _remove_mean(v: Tensor, node_mask: Tensor) -> Tensor:
    """v [B, N, 3] minus its mean over the real atoms (node_mask [B, N, 1])."""
    mean = (v * node_mask).sum(1, keepdim=True) / node_mask.sum(1, keepdim=True).clamp(min=1)
    return (v - mean) * node_mask


def _time_column(t: Tensor | float, n_batch: int, n_atoms: int, like: Tensor) -> Tensor:
    """t (a number, [B] or [B, 1]) as [B, N, 1]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1, 1).expand(n_batch, n_atoms, 1)


class EGNN_dynamics_AD2_cat(nn.Module):
    """Single-molecule dynamics: v(t, xs) for xs [B, 3N] of the molecule described by h_initial [N, F]."""

    def __init__(self, n_particles: int, h_initial: Tensor, hidden_nf: int, n_layers: int, attention: bool = True,
                 tanh: bool = True) -> None:
        super().__init__()
        self.h_initial = h_initial  # a plain attribute, as published (not a buffer)
        self.egnn = PublishedEGNN(h_initial.shape[1] + 1, hidden_nf, n_layers, attention, tanh)
        self._n_particles, self._n_dimension = n_particles, 3
        self.condition_time, self.mode = True, "egnn_dynamics"
        pairs = [(i, j) for i in range(n_particles) for j in range(n_particles) if i != j]
        self.edges = [torch.tensor([i for i, _ in pairs]), torch.tensor([j for _, j in pairs])]

    def forward(self, t: Tensor | float, xs: Tensor) -> Tensor:
        n_batch, n = xs.shape[0], self._n_particles
        x = xs.reshape(n_batch, n, 3)
        features = self.h_initial.to(xs).expand(n_batch, n, -1)
        features = torch.cat([features, _time_column(t, n_batch, n, xs)], -1)
        ones = xs.new_ones(n_batch, n, 1)
        edge_mask = self._edge_mask(n, xs).expand(n_batch, n, n, 1)
        v = self.egnn(features, x, ones, edge_mask) - x
        return _remove_mean(v, ones).reshape(n_batch, 3 * n)

    def _edge_mask(self, n: int, like: Tensor) -> Tensor:
        """[1, N, N, 1] with 1 on the edges of ``self.edges``."""
        mask = like.new_zeros(n, n)
        mask[self.edges[0], self.edges[1]] = 1
        return mask[None, :, :, None]


class EGNN_dynamics_transferable_MD(nn.Module):
    """Padded dynamics of the transfer model: v(t, xs, h, node_mask, edge_mask), xs [B, 3 N_max]."""

    def __init__(self, n_particles: int, h_size: int, hidden_nf: int, n_layers: int) -> None:
        super().__init__()
        self.egnn = PublishedEGNN(h_size + 1, hidden_nf, n_layers)
        self._n_particles, self._n_dimension = n_particles, 3
        self.condition_time, self.mode = True, "egnn_dynamics"

    def forward(self, t: Tensor | float, xs: Tensor, h: Tensor, node_mask: Tensor, edge_mask: Tensor) -> Tensor:
        n_batch, n = xs.shape[0], self._n_particles
        node = node_mask.reshape(n_batch, n, 1).to(xs)
        x = xs.reshape(n_batch, n, 3) * node
        features = torch.cat([h.reshape(n_batch, n, -1).to(xs), _time_column(t, n_batch, n, xs)], -1) * node
        v = (self.egnn(features, x, node, edge_mask.reshape(n_batch, n, n, 1).to(xs)) - x) * node
        return _remove_mean(v, node).reshape(n_batch, 3 * n)


class NetDynamicsWrapper(nn.Module):
    """One molecule of n_particles real atoms (features h_initial [n, F]) padded to max_n_particles."""

    def __init__(self, net_dynamics: EGNN_dynamics_transferable_MD, n_particles: int, max_n_particles: int,
                 h_initial: Tensor) -> None:
        super().__init__()
        self.net_dynamics = net_dynamics
        self.n_particles = n_particles
        pad = max_n_particles - n_particles
        self.node_mask = torch.cat([torch.ones(1, n_particles), torch.zeros(1, pad)], 1)
        self.edge_mask = self.node_mask[:, :, None] * self.node_mask[:, None, :] * (1 - torch.eye(max_n_particles))
        self.h_initial = torch.cat([h_initial, torch.zeros(pad, h_initial.shape[1])]).unsqueeze(0)

    def forward(self, t: Tensor | float, xs: Tensor) -> Tensor:
        n_batch = xs.shape[0]
        return self.net_dynamics(t, xs, self.h_initial.expand(n_batch, -1, -1), self.node_mask.expand(n_batch, -1),
                                 self.edge_mask.expand(n_batch, -1, -1))
