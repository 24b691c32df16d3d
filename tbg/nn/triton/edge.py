"""Triton building blocks of one EGNN layer's edge work, on a tile of edges that share a receiver.

A tile is one receiving atom i and up to J senders j (``j_ok`` masks the padding and j == i); H is
padded to a power of two (the padded channels of every weight load are zero, so they stay zero).
These jit functions hold the layer's algebra (tbg.nn.reference, written the way the kernels use it):

    d = x_i - x_j, r = |d|^2, a = |x0_i - x0_j|^2 (the fixed edge attribute), s = sqrt(r + eps) + 1
    pre1 = P_i + Q_j + r wr + a wa            P = h W1i^T + b1, Q = h W1j^T (node-level products)
    m0 = SiLU(SiLU(pre1) W2^T + b2), g = sigmoid(m0 . watt + batt), m = g m0
    phi = tanh(SiLU(m Wc1^T + bc1) . wc2), x_i += range sum_j phi d / s, agg_i = sum_j m

``edge_geometry`` loads a tile's distances, ``edge_mlp`` is the primal edge MLP of a tile and returns
what its tangents need, ``edge_mlp_tangent``
pushes first-linear tangents of many rows per edge through the two H x H products with ``tl.dot``
(the epilogues - SiLU slopes, attention gate, coordinate head - applied in registers). They serve
the exact divergence / JVP kernels (tbg.nn.triton.divergence) and are meant for the fused EGNN
forward / backward in Triton as well.

Only long-stable Triton features are used (tl.dot with input_precision, tl.reshape, masks), so the
code runs under Triton 3.6 on a GPU and under the interpreter (TRITON_INTERPRET=1) on CPU tensors.
No libdevice: the interpreter has none, so tanh is written out. Sigmoid, the SiLU slopes and tanh are
written inline rather than as jit helpers (tl.sigmoid is one too): under the interpreter every nested
jit call re-patches triton.language, milliseconds each, a large part of the CPU test time.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def edge_geometry(x_ptr, x0_ptr, i, j, j_ok, EPS: tl.constexpr):
    """Geometry of the edges (i, j), coordinates padded to 4 (the 4th is zero): d = x_i - x_j [J, 4],
    r = |d|^2, sqrt(r + eps), s = sqrt(r + eps) + 1 [J], and e = x0_i - x0_j [J, 4] (the fixed edge
    attribute is a = |e|^2)."""
    c = tl.arange(0, 4)
    c_ok = c < 3
    ok = j_ok[:, None] & c_ok[None, :]
    xj = j[:, None] * 3 + c[None, :]
    d = tl.load(x_ptr + i * 3 + c, mask=c_ok, other=0.0)[None, :] - tl.load(x_ptr + xj, mask=ok, other=0.0)
    e = tl.load(x0_ptr + i * 3 + c, mask=c_ok, other=0.0)[None, :] - tl.load(x0_ptr + xj, mask=ok, other=0.0)
    r = tl.sum(d * d, axis=1)
    sq = tl.sqrt(r + EPS)
    return d, r, sq, sq + 1, e


@triton.jit
def edge_mlp(pre1, w2t_ptr, b2, watt, batt, wc1t_ptr, bc1, wc2, offs_h, h_ok, H, PRECISION: tl.constexpr):
    """Primal edge MLP of a tile from the first linear's pre-activation pre1 [J, H]; w2t_ptr / wc1t_ptr
    point at the transposed (input-major) H x H weights, read here as tl.dot's right operand.

    Returns the gated message m [J, H], the coordinate weight phi [J] (before the range factor), the
    two H x H weights as loaded, and what tangents need: slope1, m0, slope2 [J, H], the gate g [J] and
    slopec [J, H] (SiLU slopes s (1 + z (1 - s)), s = sigmoid(z)).
    """
    w_ok = h_ok[:, None] & h_ok[None, :]
    w2t = tl.load(w2t_ptr + offs_h[:, None] * H + offs_h[None, :], mask=w_ok, other=0.0)
    wc1t = tl.load(wc1t_ptr + offs_h[:, None] * H + offs_h[None, :], mask=w_ok, other=0.0)
    s1 = 1 / (1 + tl.exp(-pre1))
    slope1 = s1 * (1 + pre1 * (1 - s1))
    z2 = tl.dot(pre1 * s1, w2t, input_precision=PRECISION, out_dtype=pre1.dtype) + b2[None, :]
    s2 = 1 / (1 + tl.exp(-z2))
    m0 = z2 * s2
    g = 1 / (1 + tl.exp(-tl.sum(m0 * watt[None, :], axis=1) - batt))
    m = m0 * g[:, None]
    zc = tl.dot(m, wc1t, input_precision=PRECISION, out_dtype=pre1.dtype) + bc1[None, :]
    sc = 1 / (1 + tl.exp(-zc))
    # tanh without libdevice (the interpreter has none): an odd Taylor polynomial where |y| < 0.05
    # (truncation < 1e-13 relative), the exp form elsewhere (no cancellation there).
    y = tl.sum(zc * sc * wc2[None, :], axis=1)
    ay = tl.abs(y)
    ex = tl.exp(-2 * ay)
    y2 = ay * ay
    th = tl.where(ay < 0.05, ay * (1 + y2 * (-1 / 3 + y2 * (2 / 15 + y2 * (-17 / 315)))), (1 - ex) / (1 + ex))
    phi = tl.where(y < 0, -th, th)
    return m, phi, w2t, wc1t, slope1, m0, s2 * (1 + z2 * (1 - s2)), g, sc * (1 + zc * (1 - sc))


@triton.jit
def edge_mlp_tangent(du, slope2, m0, g, slopec, phi, w2t, watt, wc1t, wc2, PRECISION: tl.constexpr):
    """Tangents of the message and the coordinate weight for R rows per edge of a tile.

    du [R, J, H]: tangent of SiLU(pre1) (the first linear's tangent times slope1) for R rows (tangents)
    of each of the J edges; the primal quantities of the tile ([J, H], [J]) broadcast over the rows.
    The two H x H products run as one [R * J, H] x [H, H] tl.dot each. Returns dm [R, J, H] (tangent of
    the gated message) and dphi [R, J].
    """
    R: tl.constexpr = du.shape[0]
    J: tl.constexpr = du.shape[1]
    H: tl.constexpr = du.shape[2]
    y = tl.dot(tl.reshape(du, (R * J, H)), w2t, input_precision=PRECISION, out_dtype=du.dtype)
    y = tl.reshape(y, (R, J, H)) * slope2[None, :, :]
    gate = tl.sum(y * watt[None, None, :], axis=2) * (g * (1 - g))[None, :]
    dm = y * g[None, :, None] + m0[None, :, :] * gate[:, :, None]
    yc = tl.dot(tl.reshape(dm, (R * J, H)), wc1t, input_precision=PRECISION, out_dtype=du.dtype)
    yc = tl.reshape(yc, (R, J, H)) * slopec[None, :, :]
    dphi = (1 - phi * phi)[None, :] * tl.sum(yc * wc2[None, None, :], axis=2)
    return dm, dphi
