// CPU kernels of tbg::egnn_divergence and tbg::egnn_jvp (semantics: egnn_divergence / egnn_jvp of
// tbg/nn/reference.py), float32 and float64, ragged layout.
//
// Algorithm: forward-mode differentiation interleaved with the primal pass. Work items are
// (molecule, chunk of T tangents), run with at::parallel_for; each item recomputes the molecule's
// primal layer by layer (cheap next to T tangents) and carries the tangents of x [T, n, 3] and h
// [T, n, H] through the same layer. Per-tangent edge work is batched over tangents, so the two
// H x H edge products are single [T * edges, H] x [H, H] GEMMs (ATen -> BLAS, one thread each
// inside the parallel region). Everything is per molecule: no work on padding, memory O(T n^2 H).
//
// Structure exploited by the exact trace (each claim is checked in tests/test_divergence.py):
// - h^0 = embedding([f, t]) does not depend on x: the h tangent starts at zero.
// - The trace is taken of the displacement d = x^L - x^0; mean removal does not change it
//   (translation invariance), so no tangent goes through the mean.
// - Layer 1: unit tangent (a, k) moves only edges incident to a (2 (n - 1) of n (n - 1)), and there
//   the edge attribute tangent equals the distance tangent (a = r at layer 1).
// - Last layer: tangent (a, k) needs only output (a, k), so only the n - 1 edges received by a and
//   only coordinate k; the node update of the last layer feeds nothing and is skipped entirely.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/constants.h"
#include "common/egnn_args.h"

namespace tbg {
namespace {

using at::Tensor;
namespace idx = at::indexing;

// One layer's weights, split the way the algebra uses them.
struct LayerW {
  Tensor w1i, w1j, wr, wa, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1h, wn1a, bn1, wn2, bn2;
};

std::vector<LayerW> split_layers(const EGNNWeights& w) {
  const int64_t H = w.hidden;
  std::vector<LayerW> out;
  for (int64_t l = 0; l < w.n_layers; ++l) {
    const Tensor w1 = w.w1[l];
    const Tensor wn1 = w.wn1[l];
    out.push_back({w1.narrow(1, 0, H), w1.narrow(1, H, H), w1.select(1, 2 * H).contiguous(),
                   w1.select(1, 2 * H + 1).contiguous(), w.b1[l], w.w2[l], w.b2[l], w.watt[l],
                   w.batt[l], w.wc1[l], w.bc1[l], w.wc2[l], wn1.narrow(1, 0, H), wn1.narrow(1, H, H),
                   w.bn1[l], w.wn2[l], w.bn2[l]});
  }
  return out;
}

// SiLU(z) and its derivative from the same sigmoid.
std::pair<Tensor, Tensor> silu_and_slope(const Tensor& z) {
  const Tensor s = at::sigmoid(z);
  return {z * s, s * (1 + z * (1 - s))};
}

// The edges of one molecule of n atoms: every i != j, receiver-major (i, then j), as ragged_edges.
struct Edges {
  Tensor row, col;  // [E]
  int64_t n, E;
};

Edges molecule_edges(int64_t n, const at::TensorOptions& opt) {
  const Tensor i = at::arange(n, opt).repeat_interleave(n - 1);
  const Tensor k = at::arange(n - 1, opt).repeat({n});  // position among the n - 1 senders
  return {i, k + (k >= i).to(at::kLong), n, n * (n - 1)};
}

// The primal activations of one layer's edges that the tangents need (contiguous, [E, ...]).
struct EdgeCache {
  Tensor d, sq, s, nv;                         // [E, 3], [E], [E], [E, 3]
  Tensor slope1, slope2, m0, g, slopec, phi;   // [E, H] x3, [E], [E, H], [E]
};

// Primal edge pass of one layer: the cache, x after the coordinate update, and agg = sum_j m_ij.
EdgeCache primal_edges(const LayerW& w, const Edges& e, const Tensor& h, const Tensor& x,
                       const Tensor& a, double range, Tensor& x_next, Tensor& agg) {
  EdgeCache c;
  c.d = x.index_select(0, e.row) - x.index_select(0, e.col);
  const Tensor r = (c.d * c.d).sum(1);
  c.sq = at::sqrt(r + kEdgeEps);
  c.s = c.sq + 1;
  c.nv = c.d / c.s.unsqueeze(1);
  const Tensor P = at::linear(h, w.w1i, w.b1), Q = at::linear(h, w.w1j);
  const Tensor pre1 = P.index_select(0, e.row) + Q.index_select(0, e.col) + r.unsqueeze(1) * w.wr +
                      a.unsqueeze(1) * w.wa;
  auto [u, sl1] = silu_and_slope(pre1);
  auto [m0, sl2] = silu_and_slope(at::linear(u, w.w2, w.b2));
  c.slope1 = sl1;
  c.slope2 = sl2;
  c.m0 = m0;
  c.g = at::sigmoid(at::mv(m0, w.watt) + w.batt);
  const Tensor m = m0 * c.g.unsqueeze(1);
  auto [cc, slc] = silu_and_slope(at::linear(m, w.wc1, w.bc1));
  c.slopec = slc;
  c.phi = at::tanh(at::mv(cc, w.wc2));
  x_next = x + (c.nv * (c.phi * range).unsqueeze(1)).view({e.n, e.n - 1, 3}).sum(1);
  agg = m.view({e.n, e.n - 1, -1}).sum(1);
  return c;
}

// Node update h + Wn2 SiLU(Wn1 [h, agg] + bn1) + bn2; also returns the SiLU slope for tangents.
std::pair<Tensor, Tensor> primal_nodes(const LayerW& w, const Tensor& h, const Tensor& agg) {
  auto [hz, slz] = silu_and_slope(at::linear(h, w.wn1h, w.bn1) + at::linear(agg, w.wn1a));
  return {h + at::linear(hz, w.wn2, w.bn2), slz};
}

// Per-work-item state of the tangents: dX [T, n, 3], dH [T, n, H] (undefined while zero),
// dP / dQ = dH W1i^T / dH W1j^T (the h part of the first edge linear, receiver / sender side),
// da [T, E] (tangent of the fixed edge attribute; written by layer 1).
struct Tangents {
  Tensor dX, dH, dP, dQ, da;
};

// Tangent of the edge MLP and coordinate head on `rows` (tangent, edge) pairs given by row_of,
// blocked R rows at a time so the [R, H] activations stay in cache and the two H x H products are
// [R, H] x [H, H] GEMMs. Adds the coordinate tangent of each edge to dXn[t, i] and, when dagg is
// given, the message tangent to dagg[t, i]. Layer 1 (first): the edge-attribute tangent equals
// the distance tangent (x = x^0 there); it is stored into da for the later layers.
template <typename S, typename RowOf>
void edge_rows(const LayerW& w, const EdgeCache& c, int64_t n, int64_t rows, RowOf row_of, const Tangents& tg,
               bool first, S range, S* dXn, S* dagg, Tensor& bufA, Tensor& bufB) {
  const int64_t H = bufA.size(1), R = bufA.size(0), E = n * (n - 1);
  const S *d = c.d.data_ptr<S>(), *sq = c.sq.data_ptr<S>(), *sv = c.s.data_ptr<S>(), *nv = c.nv.data_ptr<S>();
  const S *sl1 = c.slope1.data_ptr<S>(), *sl2 = c.slope2.data_ptr<S>(), *m0 = c.m0.data_ptr<S>();
  const S *g = c.g.data_ptr<S>(), *slc = c.slopec.data_ptr<S>(), *phi = c.phi.data_ptr<S>();
  const S *wr = w.wr.data_ptr<S>(), *wa = w.wa.data_ptr<S>(), *watt = w.watt.data_ptr<S>(),
          *wc2 = w.wc2.data_ptr<S>();
  const S* dX = tg.dX.data_ptr<S>();
  const S* dP = tg.dP.defined() ? tg.dP.data_ptr<S>() : nullptr;
  const S* dQ = tg.dQ.defined() ? tg.dQ.data_ptr<S>() : nullptr;
  S* da = tg.da.data_ptr<S>();
  S *A = bufA.data_ptr<S>(), *Bf = bufB.data_ptr<S>();
  const Tensor w2t = w.w2.t(), wc1t = w.wc1.t();
  std::vector<S> ddr(4 * R);             // dd (3) and dr of each row of the block
  std::vector<int64_t> rte(3 * R);      // t, e, i of each row
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const int64_t nr = std::min(R, rows - r0);
    for (int64_t q = 0; q < nr; ++q) {
      const auto [t, e] = row_of(r0 + q);
      const int64_t i = e / (n - 1), k = e % (n - 1), j = k + (k >= i);
      rte[3 * q] = t, rte[3 * q + 1] = e, rte[3 * q + 2] = i;
      const S* xi = dX + (t * n + i) * 3;
      const S* xj = dX + (t * n + j) * 3;
      S* dd = ddr.data() + 4 * q;
      dd[0] = xi[0] - xj[0], dd[1] = xi[1] - xj[1], dd[2] = xi[2] - xj[2];
      const S dr = 2 * (dd[0] * d[3 * e] + dd[1] * d[3 * e + 1] + dd[2] * d[3 * e + 2]);
      dd[3] = dr;
      S dav;
      if (first) {
        da[t * E + e] = dr;
        dav = dr;
      } else {
        dav = da[t * E + e];
      }
      S* u = A + q * H;
      const S* s1 = sl1 + e * H;
      if (dP) {
        const S* p = dP + (t * n + i) * H;
        const S* qq = dQ + (t * n + j) * H;
        for (int64_t h = 0; h < H; ++h) u[h] = (dr * wr[h] + dav * wa[h] + p[h] + qq[h]) * s1[h];
      } else {
        for (int64_t h = 0; h < H; ++h) u[h] = (dr * wr[h] + dav * wa[h]) * s1[h];
      }
    }
    Tensor a_blk = bufA.narrow(0, 0, nr), b_blk = bufB.narrow(0, 0, nr);
    at::mm_out(b_blk, a_blk, w2t);  // d pre-activation of the second edge linear
    for (int64_t q = 0; q < nr; ++q) {
      const int64_t t = rte[3 * q], e = rte[3 * q + 1], i = rte[3 * q + 2];
      S* y = Bf + q * H;
      const S* s2 = sl2 + e * H;
      const S* m = m0 + e * H;
      S dot = 0;
      for (int64_t h = 0; h < H; ++h) {
        y[h] *= s2[h];
        dot += y[h] * watt[h];
      }
      const S ge = g[e], coef = dot * ge * (1 - ge);
      S* u = A + q * H;
      for (int64_t h = 0; h < H; ++h) u[h] = y[h] * ge + m[h] * coef;  // d m (gated message)
      if (dagg) {
        S* ag = dagg + (t * n + i) * H;
        for (int64_t h = 0; h < H; ++h) ag[h] += u[h];
      }
    }
    at::mm_out(b_blk, a_blk, wc1t);  // d pre-activation of the coordinate MLP
    for (int64_t q = 0; q < nr; ++q) {
      const int64_t t = rte[3 * q], e = rte[3 * q + 1], i = rte[3 * q + 2];
      const S* y = Bf + q * H;
      const S* sc = slc + e * H;
      S dot = 0;
      for (int64_t h = 0; h < H; ++h) dot += y[h] * sc[h] * wc2[h];
      const S ph = phi[e], dphi = (1 - ph * ph) * dot;
      const S* dd = ddr.data() + 4 * q;
      const S se = sv[e], coef = dd[3] / (2 * sq[e] * se * se);
      S* out = dXn + (t * n + i) * 3;
      for (int64_t k = 0; k < 3; ++k) {
        const S dn = dd[k] / se - d[3 * e + k] * coef;
        out[k] += (dn * ph + nv[3 * e + k] * dphi) * range;
      }
    }
  }
}

// Node part of a tangent step (after edge_rows filled dagg): dH += Wn2 (slope * (Wn1 [dH, dagg])),
// then the h parts of the next layer's first edge linear.
void node_tangent(const LayerW& w, const LayerW* next, const Tensor& slz, const Tensor& dagg, Tangents& tg) {
  Tensor dz = at::matmul(dagg, w.wn1a.t());
  if (tg.dH.defined()) dz = dz + at::matmul(tg.dH, w.wn1h.t());
  const Tensor dh = at::matmul(dz * slz, w.wn2.t());
  tg.dH = tg.dH.defined() ? tg.dH + dh : dh;
  if (next != nullptr) {
    tg.dP = at::matmul(tg.dH, next->w1i.t()).contiguous();
    tg.dQ = at::matmul(tg.dH, next->w1j.t()).contiguous();
  }
}

struct Molecule {
  int64_t b, start, n;
};

// Rows of the edge pass per layer. Dense: every (tangent, edge). Unit tangent (a, k) = t0 + t:
// layer 1 only the 2 (n - 1) edges incident to a (out edges (a, j), then in edges (i, a)); last
// layer only the n - 1 edges a receives.
template <typename S>
S run_item(const std::vector<LayerW>& layers, const Tensor& x, const Tensor& h0, const Molecule& mol,
           double range_d, int64_t t0, int64_t T, const Tensor& tangents, Tensor v_out, Tensor jvp_out) {
  const int64_t n = mol.n, L = static_cast<int64_t>(layers.size()), E = n * (n - 1);
  const int64_t H = h0.size(1);
  const S range = static_cast<S>(range_d);
  const auto fopt = x.options();
  const Edges e = molecule_edges(n, fopt.dtype(at::kLong));
  const Tensor x0 = x.narrow(0, mol.start, n);
  Tensor xl = x0, h = h0.narrow(0, mol.start, n);
  const Tensor d0 = x0.index_select(0, e.row) - x0.index_select(0, e.col);
  const Tensor a = (d0 * d0).sum(1);
  const bool unit = !tangents.defined();
  Tangents tg;
  if (unit) {
    tg.dX = at::zeros({T, n, 3}, fopt);
    S* p = tg.dX.data_ptr<S>();
    for (int64_t t = 0; t < T; ++t) p[t * 3 * n + t0 + t] = 1;  // tangent index 3 a + k
  } else {
    tg.dX = tangents.contiguous();
  }
  tg.da = at::zeros({T, E}, fopt);  // unit tangents leave non-incident edges at zero
  const int64_t R = std::max<int64_t>(16, 32768 / H);
  Tensor bufA = at::empty({R, H}, fopt), bufB = at::empty({R, H}, fopt);
  S trace = 0;
  for (int64_t l = 0; l < L; ++l) {
    const LayerW& w = layers[l];
    const bool last = l + 1 == L, first = l == 0;
    Tensor x_next, agg, h_next, slz;
    const EdgeCache c = primal_edges(w, e, h, xl, a, range_d, x_next, agg);
    if (!last) std::tie(h_next, slz) = primal_nodes(w, h, agg);
    Tensor dXn = tg.dX.clone();
    Tensor dagg = last ? Tensor() : at::zeros({T, n, H}, fopt);
    S* dXn_p = dXn.data_ptr<S>();
    S* dagg_p = last ? nullptr : dagg.data_ptr<S>();
    if (unit && last) {
      edge_rows<S>(w, c, n, T * (n - 1), [&](int64_t r) {
        const int64_t t = r / (n - 1), atom = (t0 + t) / 3;
        return std::pair<int64_t, int64_t>{t, atom * (n - 1) + r % (n - 1)};
      }, tg, first, range, dXn_p, nullptr, bufA, bufB);
      for (int64_t t = 0; t < T; ++t) trace += dXn_p[t * 3 * n + t0 + t] - 1;  // d(x^L - x^0)_ak / dx_ak
    } else if (unit && first) {
      const int64_t m = n - 1;
      edge_rows<S>(w, c, n, T * 2 * m, [&](int64_t r) {
        const int64_t t = r / (2 * m), q = r % (2 * m), atom = (t0 + t) / 3;
        if (q < m) return std::pair<int64_t, int64_t>{t, atom * m + q};
        const int64_t o = q - m, i = o + (o >= atom);
        return std::pair<int64_t, int64_t>{t, i * m + atom - (atom > i)};
      }, tg, first, range, dXn_p, dagg_p, bufA, bufB);
    } else {
      edge_rows<S>(w, c, n, T * E, [&](int64_t r) { return std::pair<int64_t, int64_t>{r / E, r % E}; },
                   tg, first, range, dXn_p, dagg_p, bufA, bufB);
    }
    if (!last) node_tangent(w, &layers[l + 1], slz, dagg, tg);
    tg.dX = dXn;
    xl = x_next;
    h = h_next;
  }
  if (v_out.defined()) {
    const Tensor disp = xl - x0;
    v_out.copy_(disp - disp.mean(0, true));
  }
  if (!unit) {
    const Tensor j = tg.dX - tangents;
    jvp_out.copy_(j - j.mean(1, true));
  }
  return trace;
}

std::vector<Molecule> molecules(const Tensor& mol_ptr) {
  const int64_t* p = mol_ptr.data_ptr<int64_t>();
  std::vector<Molecule> out;
  for (int64_t b = 0; b + 1 < mol_ptr.size(0); ++b) out.push_back({b, p[b], p[b + 1] - p[b]});
  return out;
}

int64_t chunk_for(int64_t n, int64_t H) {
  return std::max<int64_t>(1, kCpuTangentBudget / std::max<int64_t>(1, n * (n - 1) * H));
}

std::tuple<Tensor, Tensor> divergence_cpu(const Tensor& x, const Tensor& h0, const Tensor& mol_ptr,
                                          const Tensor& w1, const Tensor& b1, const Tensor& w2,
                                          const Tensor& b2, const Tensor& watt, const Tensor& batt,
                                          const Tensor& wc1, const Tensor& bc1, const Tensor& wc2,
                                          const Tensor& wn1, const Tensor& bn1, const Tensor& wn2,
                                          const Tensor& bn2, double coords_range, int64_t tangent_chunk) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the op has no autograd formula
  const EGNNWeights w = check_egnn_args("egnn_divergence", x, h0, mol_ptr,
                                        {w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2});
  TORCH_CHECK(tangent_chunk >= 1, "egnn_divergence: tangent_chunk must be >= 1, got ", tangent_chunk);
  TORCH_CHECK(at::isfinite(x).all().item<bool>(), "egnn_divergence: x contains NaN or infinite values");
  const auto layers = split_layers(w);
  const auto mols = molecules(mol_ptr);
  const int64_t B = static_cast<int64_t>(mols.size());
  Tensor v = at::zeros_like(x);
  // Work items (molecule, first tangent); molecules of one atom have v = 0 and div = 0.
  std::vector<std::pair<int64_t, int64_t>> items;
  for (const Molecule& m : mols) {
    for (int64_t t0 = 0; m.n > 1 && t0 < 3 * m.n; t0 += tangent_chunk) items.emplace_back(m.b, t0);
  }
  Tensor partial = at::zeros({static_cast<int64_t>(items.size())}, x.options());
  const double range = coords_range;  // per-layer factor (the module passes coords_range / L)
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const Molecule& m = mols[items[it].first];
      const int64_t t0 = items[it].second, T = std::min(tangent_chunk, 3 * m.n - t0);
      Tensor v_out = t0 == 0 ? v.narrow(0, m.start, m.n) : Tensor();
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "egnn_divergence", [&] {
        partial[it].fill_(run_item<scalar_t>(layers, x, h0, m, range, t0, T, Tensor(), v_out, Tensor()));
      });
    }
  });
  // Deterministic per-molecule sums of the chunk partials.
  std::vector<int64_t> owner;
  for (const auto& item : items) owner.push_back(item.first);
  Tensor div = at::zeros({B}, x.options());
  if (!items.empty()) div.index_add_(0, at::tensor(owner, mol_ptr.options()), partial);
  return {v, div};
}

std::tuple<Tensor, Tensor> jvp_cpu(const Tensor& x, const Tensor& h0, const Tensor& mol_ptr, const Tensor& w1,
                                   const Tensor& b1, const Tensor& w2, const Tensor& b2, const Tensor& watt,
                                   const Tensor& batt, const Tensor& wc1, const Tensor& bc1, const Tensor& wc2,
                                   const Tensor& wn1, const Tensor& bn1, const Tensor& wn2, const Tensor& bn2,
                                   const Tensor& tangents, double coords_range) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the op has no autograd formula
  const EGNNWeights w = check_egnn_args("egnn_jvp", x, h0, mol_ptr,
                                        {w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2});
  TORCH_CHECK(tangents.dim() == 3 && tangents.size(1) == x.size(0) && tangents.size(2) == 3,
              "egnn_jvp: tangents must have shape [K, M, 3] with M = ", x.size(0), ", got ", tangents.sizes());
  TORCH_CHECK(tangents.scalar_type() == x.scalar_type() && tangents.device() == x.device() &&
                  tangents.is_contiguous(),
              "egnn_jvp: tangents must be contiguous and match x in dtype and device");
  TORCH_CHECK(at::isfinite(x).all().item<bool>() && at::isfinite(tangents).all().item<bool>(),
              "egnn_jvp: x or tangents contain NaN or infinite values");
  const auto layers = split_layers(w);
  const auto mols = molecules(mol_ptr);
  const int64_t K = tangents.size(0);
  Tensor v = at::zeros_like(x);
  Tensor jvp = at::zeros_like(tangents);
  std::vector<std::pair<int64_t, int64_t>> items;
  for (const Molecule& m : mols) {
    const int64_t T = chunk_for(m.n, w.hidden);
    // An item with no tangents still computes v (K = 0).
    for (int64_t k0 = 0; m.n > 1 && (k0 < K || k0 == 0); k0 += T) items.emplace_back(m.b, k0);
  }
  const double range = coords_range;  // per-layer factor (the module passes coords_range / L)
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const Molecule& m = mols[items[it].first];
      const int64_t k0 = items[it].second, T = std::min(chunk_for(m.n, w.hidden), K - k0);
      Tensor v_out = k0 == 0 ? v.narrow(0, m.start, m.n) : Tensor();
      Tensor tan = tangents.narrow(0, k0, T).narrow(1, m.start, m.n);
      Tensor out = jvp.narrow(0, k0, T).narrow(1, m.start, m.n);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "egnn_jvp",
                                 [&] { run_item<scalar_t>(layers, x, h0, m, range, k0, T, tan, v_out, out); });
    }
  });
  return {v, jvp};
}

}  // namespace

TORCH_LIBRARY_IMPL(tbg, CPU, m) {
  m.impl("egnn_divergence", &divergence_cpu);
  m.impl("egnn_jvp", &jvp_cpu);
}

}  // namespace tbg
