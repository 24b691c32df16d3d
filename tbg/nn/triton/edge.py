"""Triton building blocks of one EGNN layer's edge work, on a tile of edge rows.

A tile is a set of rows (i, j), receiver i and sender j of one molecule, masked by ``ok`` (padding and
j == i). H is padded to a power of two (the padded channels of every weight load are zero, so they stay
zero). These jit functions hold the layer's algebra (tbg.nn.reference, written the way the kernels use
it):

    d = x_i - x_j, r = |d|^2, a = |x0_i - x0_j|^2 (the fixed edge attribute), s = sqrt(r + eps) + 1
    pre1 = P_i + Q_j + r wr + a wa            P = h W1i^T + b1, Q = h W1j^T (node-level products)
    u = SiLU(pre1), m0 = SiLU(u W2^T + b2), g = sigmoid(m0 . watt + batt), m = g m0
    phi = tanh(SiLU(m Wc1^T + bc1) . wc2), x_i += range sum_j phi d / s, agg_i = sum_j m

``edge_geometry`` loads a tile's distances; ``edge_message`` (the W2 half: what the aggregation needs)
and ``edge_coordinate`` (the Wc1 half: the coordinate weight) are the primal edge MLP and return what
derivatives need; ``edge_mlp_tangent`` pushes first-linear tangents of many rows per edge through the
two H x H products (forward mode, the divergence / JVP kernels of tbg.nn.triton.divergence);
``edge_mlp_backward`` is reverse mode through both halves (the EGNN backward of tbg.nn.triton.egnn).
Every H x H product is one ``tl.dot`` over the tile's rows; the epilogues - SiLU slopes, attention gate,
coordinate head - run in registers.

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
def edge_geometry(x_ptr, x0_ptr, i, j, ok, EPS: tl.constexpr):
    """Geometry of the rows (i, j) (i a scalar or one receiver per row like j), coordinates padded to 4
    (the 4th is zero): d = x_i - x_j [R, 4], r = |d|^2, sqrt(r + eps), s = sqrt(r + eps) + 1 [R], and
    e = x0_i - x0_j [R, 4] (the fixed edge attribute is a = |e|^2). Rows where ok is false read zeros."""
    c = tl.arange(0, 4)
    mask = ok[:, None] & (c < 3)[None, :]
    xi = (i + tl.zeros_like(j))[:, None] * 3 + c[None, :]
    xj = j[:, None] * 3 + c[None, :]
    d = tl.load(x_ptr + xi, mask=mask, other=0.0) - tl.load(x_ptr + xj, mask=mask, other=0.0)
    e = tl.load(x0_ptr + xi, mask=mask, other=0.0) - tl.load(x0_ptr + xj, mask=mask, other=0.0)
    r = tl.sum(d * d, axis=1)
    sq = tl.sqrt(r + EPS)
    return d, r, sq, sq + 1, e


@triton.jit
def edge_message(pre1, w2t_ptr, b2, watt, batt, offs_h, h_ok, H, PRECISION: tl.constexpr):
    """The message half of the edge MLP from the first linear's pre-activation pre1 [R, H]; w2t_ptr points
    at W2^T (input-major), read here as tl.dot's right operand.

    Returns u = SiLU(pre1) and its slope slope1, W2^T as loaded, m0 and its SiLU slope slope2 [R, H], the
    gate g [R] and the gated message m [R, H] (SiLU slopes: s (1 + z (1 - s)), s = sigmoid(z)).
    """
    w2t = tl.load(w2t_ptr + offs_h[:, None] * H + offs_h[None, :], mask=h_ok[:, None] & h_ok[None, :], other=0.0)
    s1 = 1 / (1 + tl.exp(-pre1))
    u = pre1 * s1
    z2 = tl.dot(u, w2t, input_precision=PRECISION, out_dtype=pre1.dtype) + b2[None, :]
    s2 = 1 / (1 + tl.exp(-z2))
    m0 = z2 * s2
    g = 1 / (1 + tl.exp(-tl.sum(m0 * watt[None, :], axis=1) - batt))
    return u, s1 * (1 + pre1 * (1 - s1)), w2t, m0, s2 * (1 + z2 * (1 - s2)), g, m0 * g[:, None]


@triton.jit
def edge_coordinate(m, wc1t_ptr, bc1, wc2, offs_h, h_ok, H, PRECISION: tl.constexpr):
    """The coordinate half of the edge MLP from the message m [R, H]; wc1t_ptr points at Wc1^T.

    Returns the coordinate weight phi [R] (before the range factor), Wc1^T as loaded, sc = SiLU(zc) and
    its slope slopec [R, H] (zc = m Wc1^T + bc1).
    """
    wc1t = tl.load(wc1t_ptr + offs_h[:, None] * H + offs_h[None, :], mask=h_ok[:, None] & h_ok[None, :],
                   other=0.0)
    zc = tl.dot(m, wc1t, input_precision=PRECISION, out_dtype=m.dtype) + bc1[None, :]
    sig = 1 / (1 + tl.exp(-zc))
    sc = zc * sig
    # tanh without libdevice (the interpreter has none): an odd Taylor polynomial where |y| < 0.05
    # (truncation < 1e-13 relative), the exp form elsewhere (no cancellation there).
    y = tl.sum(sc * wc2[None, :], axis=1)
    ay = tl.abs(y)
    ex = tl.exp(-2 * ay)
    y2 = ay * ay
    th = tl.where(ay < 0.05, ay * (1 + y2 * (-1 / 3 + y2 * (2 / 15 + y2 * (-17 / 315)))), (1 - ex) / (1 + ex))
    return tl.where(y < 0, -th, th), wc1t, sc, sig * (1 + zc * (1 - sig))


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


@triton.jit
def edge_mlp_backward(gy, gm_in, slope1, m0, slope2, g, slopec, w2_ptr, watt, wc1_ptr, wc2, offs_h, h_ok, H,
                      PRECISION: tl.constexpr):
    """Reverse mode through the edge MLP for the rows of a tile.

    gy [R]: gradient of y = SiLU(zc) . wc2 (the coordinate head before tanh); gm_in [R, H]: gradient
    reaching the message m directly (from the node MLP, through agg); the primal quantities as
    edge_message / edge_coordinate return them. w2_ptr / wc1_ptr point at W2 and Wc1 ([out, in], read as
    they are: the input gradients are [R, out] x [out, in] dots). Returns the gradient of the first
    linear's pre-activation gpre [R, H] and what the weight gradients sum over rows: gzc [R, H] (Wc1 with
    m, bc1), gz2 [R, H] (W2 with u, b2) and gsig [R] (watt with m0, batt).
    """
    w_ok = h_ok[:, None] & h_ok[None, :]
    square = offs_h[:, None] * H + offs_h[None, :]
    gzc = gy[:, None] * wc2[None, :] * slopec
    gm = tl.dot(gzc, tl.load(wc1_ptr + square, mask=w_ok, other=0.0), input_precision=PRECISION,
                out_dtype=gzc.dtype) + gm_in
    gsig = tl.sum(gm * m0, axis=1) * g * (1 - g)
    gz2 = (gm * g[:, None] + gsig[:, None] * watt[None, :]) * slope2
    gpre = tl.dot(gz2, tl.load(w2_ptr + square, mask=w_ok, other=0.0), input_precision=PRECISION,
                  out_dtype=gzc.dtype) * slope1
    return gpre, gzc, gz2, gsig
