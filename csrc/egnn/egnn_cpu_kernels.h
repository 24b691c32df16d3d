// CPU kernels of the fused EGNN, templated on the scalar type. egnn_cpu.cpp includes this file
// twice, into namespace TBG_EGNN_ISA: once for baseline x86-64 and once under
// `#pragma GCC target("avx2,fma")`, and picks one at run time, so the library still loads and runs
// on CPUs without AVX2. No include guard on purpose. See egnn_cpu.cpp for the design.
//
// All per-molecule buffers use a padded hidden width Hp (a multiple of 16): the padded weight
// rows/columns are zero, which keeps every padded activation and gradient exactly zero, so the
// GEMM microkernel never needs a column tail.

#ifndef TBG_EGNN_CPU_TYPES
#define TBG_EGNN_CPU_TYPES
// Data layouts, shared by both ISA builds.
// Per-layer weights, padded to Hp and laid out for the GEMMs: `T` suffix = transposed [in, out]
// (C = A W^T), none = PyTorch's [out, in] (C = A W, the backward products; null in a forward call).
template <typename T>
struct LayerW {
  const T *w1aT, *w1bT, *w1a, *w1b, *wr, *wa, *b1;
  const T *w2T, *w2, *b2, *watt;
  T batt;
  const T *wc1T, *wc1, *bc1, *wc2;
  const T *wn1aT, *wn1bT, *wn1a, *wn1b, *bn1, *wn2T, *wn2, *bn2;
};

// Weight gradients of one layer in padded [out, in] layout (one copy per thread).
template <typename T>
struct LayerG {
  T *w1a, *w1b, *wr, *wa, *b1, *w2, *b2, *watt, *batt, *wc1, *bc1, *wc2, *wn1a, *wn1b, *bn1, *wn2, *bn2;
};

// Everything a thread needs for the edges of one receiver atom i: E = n - 1 rows, one per
// sender j != i (row e is sender e + (e >= i)).
template <typename T>
struct EdgeTile {
  T *z1, *s1, *z2, *m0, *m, *zc, *sc;  // [E, Hp]; forward-only aliases z1/s1, z2/m0/m, zc/sc
  T *geo;                               // [E, 12]: d(3), d0(3), nrm(3), r, a, s
  T *gate, *phi;                        // [E]
};
constexpr int kGeo = 12;

template <typename T>
struct Net {
  int64_t L, H, Hp;
  T range;
  std::vector<LayerW<T>> w;
};

// Per-thread weight-gradient accumulators of all layers, padded, in one zeroed buffer.
template <typename T>
struct GradAcc {
  static int64_t layer_size(int64_t Hp) { return 7 * Hp * Hp + 10 * Hp; }
  std::vector<T> buf;
  std::vector<LayerG<T>> g;
  void init(int64_t L, int64_t Hp) {
    buf.assign(L * layer_size(Hp), T(0));
    g.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      T* p = buf.data() + l * layer_size(Hp);
      auto take = [&](int64_t k) { T* q = p; p += k; return q; };
      LayerG<T>& G = g[l];
      G.w1a = take(Hp * Hp), G.w1b = take(Hp * Hp), G.w2 = take(Hp * Hp), G.wc1 = take(Hp * Hp);
      G.wn1a = take(Hp * Hp), G.wn1b = take(Hp * Hp), G.wn2 = take(Hp * Hp);
      G.wr = take(Hp), G.wa = take(Hp), G.b1 = take(Hp), G.b2 = take(Hp), G.watt = take(Hp);
      G.bc1 = take(Hp), G.wc2 = take(Hp), G.bn1 = take(Hp), G.bn2 = take(Hp), G.batt = take(Hp);
    }
  }
};

// Scratch carved from one vector: `nodes` [nmax, Hp] buffers, `tiles` [nmax, Hp] edge-tile
// buffers and small per-atom/per-edge arrays (up to 4 of [nmax, 3], the tile's geo/gate/phi).
template <typename T>
struct Scratch {
  std::vector<T> buf;
  T* p = nullptr;
  Scratch(int64_t nmax, int64_t Hp, int nodes, int tiles)
      : buf(((nodes + tiles) * nmax + 2) * Hp + nmax * (kGeo + 2 + 4 * 3) + 64) {}
  void reset() { p = buf.data(); }
  T* take(int64_t k) { T* q = p; p += k; return q; }
  EdgeTile<T> tile(int64_t nmax, int64_t Hp, bool keep) {
    EdgeTile<T> t;
    t.z1 = take(nmax * Hp);
    t.s1 = keep ? take(nmax * Hp) : t.z1;
    t.z2 = take(nmax * Hp);
    t.m0 = keep ? take(nmax * Hp) : t.z2;
    t.m = keep ? take(nmax * Hp) : t.z2;
    t.zc = take(nmax * Hp);
    t.sc = keep ? take(nmax * Hp) : t.zc;
    t.geo = take(nmax * kGeo), t.gate = take(nmax), t.phi = take(nmax);
    return t;
  }
};

// Everything one molecule of up to nmax atoms needs: the node-level buffers (`mol`, shared by
// all receiver blocks) and one edge scratch per receiver block (`part`; 1 when the molecule runs
// on one thread).
template <typename T>
struct Workspace {
  Scratch<T> mol;
  std::vector<Scratch<T>> part;
  Workspace(int64_t nmax, int64_t Hp, int64_t parts, bool backward)
      : mol(nmax, Hp, backward ? 11 : 5, 0), part(parts, Scratch<T>(nmax, Hp, backward ? 1 : 0, backward ? 9 : 3)) {}
};

// One receiver block's backward buffers: its edge tile, the two edge-gradient tiles, and partial
// sums of what its edges scatter to their senders (gQ [n, Hp], gx and gx0 [n, 3]). Carving is
// deterministic, so calling this again on the same scratch returns the same pointers.
template <typename T>
struct BackwardPart {
  EdgeTile<T> tile;
  T *g1, *g2, *gagg, *gQ, *gx, *gx0;
  BackwardPart(Scratch<T>& s, int64_t n, int64_t Hp) {
    const int64_t E = std::max<int64_t>(n - 1, 0);
    s.reset();
    tile = s.tile(n, Hp, true);
    g1 = s.take(E * Hp + 1), g2 = s.take(E * Hp + 1), gagg = s.take(Hp);
    gQ = s.take(n * Hp), gx = s.take(3 * n), gx0 = s.take(3 * n);
  }
};

// Runs fn(part, begin, end) for the blocks [n p / parts, n (p + 1) / parts) of the atoms (or
// receivers) 0..n-1, in parallel. The blocks depend on (n, parts) alone, so the partial sums and
// their reduction order do too. With parts == 1, or inside a parallel region (molecules already
// spread over threads), at::parallel_for runs the blocks inline on the calling thread.
template <typename F>
void for_parts(int64_t n, int64_t parts, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p, n * p / parts, n * (p + 1) / parts);
  });
}
#endif  // TBG_EGNN_CPU_TYPES

namespace TBG_EGNN_ISA {

// 256-bit vectors (GCC vector extensions; two SSE halves in the baseline build). Loads and
// stores go through memcpy, so nothing needs to be 32-byte aligned.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[MR x 2W] = [C] + [bias] + sum_k A(r, k) B[k, :], A(r, k) = A[r * ars + k * aks].
template <typename T, int MR>
inline void micro(int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb, T* C,
                  int64_t ldc, const T* bias, bool acc) {
  constexpr int W = 32 / sizeof(T);
  Vec<T> c0[MR], c1[MR];
  const Vec<T> z0 = bias ? load(bias) : Vec<T>{}, z1 = bias ? load(bias + W) : Vec<T>{};
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = acc ? load(C + r * ldc) + z0 : z0;
    c1[r] = acc ? load(C + r * ldc + W) + z1 : z1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> b0 = load(B + k * ldb), b1 = load(B + k * ldb + W);
    const T* a = A + k * aks;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec<T> ar = Vec<T>{} + a[r * ars];
      c0[r] += ar * b0;
      c1[r] += ar * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    store(C + r * ldc, c0[r]);
    store(C + r * ldc + W, c1[r]);
  }
}

// C[M, N] = [C +] [bias +] A(M x K) B(K x N); N a multiple of 2 vectors (16 floats / 8 doubles).
// A(m, k) = A[m * ars + k * aks]: (ars, aks) = (lda, 1) for A, (1, lda) for A^T.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb,
          T* C, int64_t ldc, const T* bias = nullptr, bool acc = false) {
  constexpr int64_t NR = 64 / sizeof(T), MR = 6;
  for (int64_t n0 = 0; n0 < N; n0 += NR) {
    const T* Bn = B + n0;
    const T* bn = bias ? bias + n0 : nullptr;
    int64_t m0 = 0;
    for (; m0 + MR <= M; m0 += MR)
      micro<T, MR>(K, A + m0 * ars, ars, aks, Bn, ldb, C + m0 * ldc + n0, ldc, bn, acc);
    const T* Am = A + m0 * ars;
    T* Cm = C + m0 * ldc + n0;
    switch (M - m0) {
      case 5: micro<T, 5>(K, Am, ars, aks, Bn, ldb, Cm, ldc, bn, acc); break;
      case 4: micro<T, 4>(K, Am, ars, aks, Bn, ldb, Cm, ldc, bn, acc); break;
      case 3: micro<T, 3>(K, Am, ars, aks, Bn, ldb, Cm, ldc, bn, acc); break;
      case 2: micro<T, 2>(K, Am, ars, aks, Bn, ldb, Cm, ldc, bn, acc); break;
      case 1: micro<T, 1>(K, Am, ars, aks, Bn, ldb, Cm, ldc, bn, acc); break;
      default: break;
    }
  }
}

// exp of 8 floats for the SiLUs of the edge MLPs (the dominant transcendental work: 3 H per
// edge): Cephes' expf polynomial, about 1 ulp on the clamped range [-87, 88] (SiLU/sigmoid
// saturate long before the clamp matters). Double precision uses libm.
inline Vec<float> vexp(Vec<float> x) {
  typedef int32_t VI __attribute__((vector_size(32)));
  const Vec<float> lo = Vec<float>{} - 87.0f, hi = Vec<float>{} + 88.0f, magic = Vec<float>{} + 12582912.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec<float> t = x * 1.44269504088896341f + magic;  // round(x / ln 2) in the low mantissa bits
  const Vec<float> n = t - magic;
  const Vec<float> r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec<float> p = Vec<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI e = ((VI)t - (VI)magic + 127) << 23;  // 2^n
  return p * (Vec<float>)e;
}

template <typename T>
inline T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// s = SiLU(z), n elements (s may alias z).
template <typename T>
inline void silu(const T* z, T* s, int64_t n) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; k + 8 <= n; k += 8) {
      const Vec<float> v = load(z + k);
      store(s + k, v / (1.0f + vexp(-v)));
    }
  }
  for (; k < n; ++k) s[k] = z[k] * sigmoid(z[k]);
}

// g <- g * SiLU'(z), SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).
template <typename T>
inline void silu_backward(const T* z, T* g, int64_t n) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; k + 8 <= n; k += 8) {
      const Vec<float> v = load(z + k), sg = 1.0f / (1.0f + vexp(-v));
      store(g + k, load(g + k) * sg * (1.0f + v * (1.0f - sg)));
    }
  }
  for (; k < n; ++k) {
    const T sg = sigmoid(z[k]);
    g[k] *= sg * (T(1) + z[k] * (T(1) - sg));
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = 32 / sizeof(T);
  Vec<T> acc{};
  int64_t k = 0;
  for (; k + W <= n; k += W) acc += load(a + k) * load(b + k);
  T s = 0;
  for (int q = 0; q < W; ++q) s += acc[q];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

template <typename T>
inline void add(const T* x, T* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += x[k];
}


// Forward of the edges of receiver i: fills the tile, returns x-displacement in dx and the
// message sum in agg (both overwritten).
template <typename T>
void edge_forward(const LayerW<T>& w, int64_t n, int64_t Hp, int64_t i, const T* x, const T* x0,
                  const T* P, const T* Q, T range, EdgeTile<T>& t, T* dx, T* agg) {
  const int64_t E = n - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t j = e + (e >= i);
    T* g = t.geo + e * kGeo;
    T r = 0, a = 0;
    for (int c = 0; c < 3; ++c) {
      g[c] = x[3 * i + c] - x[3 * j + c];
      g[3 + c] = x0[3 * i + c] - x0[3 * j + c];
      r += g[c] * g[c];
      a += g[3 + c] * g[3 + c];
    }
    const T s = std::sqrt(r + T(kEdgeEps));
    for (int c = 0; c < 3; ++c) g[6 + c] = g[c] / (s + 1);
    g[9] = r, g[10] = a, g[11] = s;
    T* z1 = t.z1 + e * Hp;
    const T *Pi = P + i * Hp, *Qj = Q + j * Hp;
    for (int64_t k = 0; k < Hp; ++k) z1[k] = Pi[k] + Qj[k] + w.wr[k] * r + w.wa[k] * a;
  }
  silu(t.z1, t.s1, E * Hp);
  gemm<T>(E, Hp, Hp, t.s1, Hp, 1, w.w2T, Hp, t.z2, Hp, w.b2);
  silu(t.z2, t.m0, E * Hp);
  std::fill(agg, agg + Hp, T(0));
  for (int64_t e = 0; e < E; ++e) {
    const T* m0 = t.m0 + e * Hp;
    T* m = t.m + e * Hp;
    const T gate = sigmoid(dot(m0, w.watt, Hp) + w.batt);
    t.gate[e] = gate;
    for (int64_t k = 0; k < Hp; ++k) m[k] = m0[k] * gate;
    add(m, agg, Hp);
  }
  gemm<T>(E, Hp, Hp, t.m, Hp, 1, w.wc1T, Hp, t.zc, Hp, w.bc1);
  silu(t.zc, t.sc, E * Hp);
  dx[0] = dx[1] = dx[2] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const T phi = std::tanh(dot(t.sc + e * Hp, w.wc2, Hp));
    t.phi[e] = phi;
    for (int c = 0; c < 3; ++c) dx[c] += range * phi * t.geo[e * kGeo + 6 + c];
  }
}

// Backward of the edges of receiver i from a tile filled by edge_forward. gxi [3]: gradient of
// the layer's output x_i; gagg [Hp] (or null): gradient of agg_i. Accumulates into gx (layer
// input x), gx0 (input coordinates, via a_ij), gQ (senders' W1b h_j), writes gP_i, and adds the
// edge weights' gradients to gw. g1, g2: [E, Hp] scratch.
template <typename T>
void edge_backward(const LayerW<T>& w, const LayerG<T>& gw, int64_t n, int64_t Hp, int64_t i, T range,
                   const EdgeTile<T>& t, const T* gxi, const T* gagg, T* g1, T* g2, T* gx, T* gx0, T* gQ,
                   T* gPi) {
  const int64_t E = n - 1;
  std::fill(gPi, gPi + Hp, T(0));
  if (E == 0) return;
  // Coordinate MLP: phi = tanh(wc2 . SiLU(zc)), trans = range * phi * nrm.
  for (int64_t e = 0; e < E; ++e) {
    const T* nrm = t.geo + e * kGeo + 6;
    const T phi = t.phi[e];
    const T gp = range * (nrm[0] * gxi[0] + nrm[1] * gxi[1] + nrm[2] * gxi[2]) * (1 - phi * phi);
    axpy(gp, t.sc + e * Hp, gw.wc2, Hp);
    T* gzc = g1 + e * Hp;
    for (int64_t k = 0; k < Hp; ++k) gzc[k] = gp * w.wc2[k];
  }
  silu_backward(t.zc, g1, E * Hp);
  for (int64_t e = 0; e < E; ++e) add(g1 + e * Hp, gw.bc1, Hp);
  gemm<T>(Hp, Hp, E, g1, 1, Hp, t.m, Hp, gw.wc1, Hp, nullptr, true);
  gemm<T>(E, Hp, Hp, g1, Hp, 1, w.wc1, Hp, g2, Hp, gagg);  // g2 = dL/dm
  // Attention gate: m = m0 * sigmoid(watt . m0 + batt).
  for (int64_t e = 0; e < E; ++e) {
    const T* m0 = t.m0 + e * Hp;
    T* gm = g2 + e * Hp;
    const T gate = t.gate[e];
    const T gu = dot(gm, m0, Hp) * gate * (1 - gate);
    *gw.batt += gu;
    axpy(gu, m0, gw.watt, Hp);
    for (int64_t k = 0; k < Hp; ++k) gm[k] = gm[k] * gate + gu * w.watt[k];
  }
  silu_backward(t.z2, g2, E * Hp);  // g2 = dL/dz2
  for (int64_t e = 0; e < E; ++e) add(g2 + e * Hp, gw.b2, Hp);
  gemm<T>(Hp, Hp, E, g2, 1, Hp, t.s1, Hp, gw.w2, Hp, nullptr, true);
  gemm<T>(E, Hp, Hp, g2, Hp, 1, w.w2, Hp, g1, Hp);  // g1 = dL/ds1
  silu_backward(t.z1, g1, E * Hp);                   // g1 = dL/dz1
  for (int64_t e = 0; e < E; ++e) {
    const int64_t j = e + (e >= i);
    const T* gz = g1 + e * Hp;
    const T* g = t.geo + e * kGeo;
    const T r = g[9], a = g[10], s = g[11], c = s + 1, phi = t.phi[e];
    add(gz, gPi, Hp);
    add(gz, gQ + j * Hp, Hp);
    axpy(r, gz, gw.wr, Hp);
    axpy(a, gz, gw.wa, Hp);
    const T gr = dot(gz, w.wr, Hp), ga = dot(gz, w.wa, Hp);
    // nrm = d / (sqrt(r + eps) + 1): d nrm / d d = I / c - d d^T / (c^2 s).
    T gn[3], dgn = 0;
    for (int q = 0; q < 3; ++q) gn[q] = range * phi * gxi[q], dgn += g[q] * gn[q];
    for (int q = 0; q < 3; ++q) {
      const T gd = 2 * gr * g[q] + gn[q] / c - g[q] * dgn / (c * c * s);
      gx[3 * i + q] += gd;
      gx[3 * j + q] -= gd;
      gx0[3 * i + q] += 2 * ga * g[3 + q];
      gx0[3 * j + q] -= 2 * ga * g[3 + q];
    }
  }
  add(gPi, gw.b1, Hp);
}


template <typename T>
void load_h(const T* src, int64_t n, int64_t H, int64_t Hp, T* h) {
  for (int64_t i = 0; i < n; ++i) {
    std::copy(src + i * H, src + (i + 1) * H, h + i * Hp);
    std::fill(h + i * Hp + H, h + (i + 1) * Hp, T(0));
  }
}

// Subtract the mean over the molecule's n atoms from v [n, 3].
template <typename T>
void remove_mean(T* v, int64_t n) {
  T mean[3] = {0, 0, 0};
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) mean[c] += v[3 * i + c];
  for (int64_t i = 0; i < n; ++i)
    for (int c = 0; c < 3; ++c) v[3 * i + c] -= mean[c] / T(n);
}

// The whole stack for one molecule of n atoms (rows of x0 [n, 3], h0 [n, H]): v [n, 3] and the
// layer inputs hs/xs (row pointers into h_states/x_states; layer stride sH/sX). Each layer is two
// passes over blocks of atoms (see for_parts): the node products P, Q of every atom, then the
// edges of each block's receivers followed by the block's node update; every write of a block is
// to its own rows, so the result does not depend on the number of blocks.
template <typename T>
void forward_molecule(const Net<T>& net, int64_t n, const T* x0, const T* h0, T* v, T* hs, int64_t sH,
                      T* xs, int64_t sX, Workspace<T>& ws) {
  const int64_t H = net.H, Hp = net.Hp, parts = std::min<int64_t>(static_cast<int64_t>(ws.part.size()), n);
  Scratch<T>& s = ws.mol;
  s.reset();
  T *h = s.take(n * Hp), *P = s.take(n * Hp), *Q = s.take(n * Hp), *agg = s.take(n * Hp), *zn = s.take(n * Hp),
    *x = s.take(3 * n), *xn = s.take(3 * n);
  load_h(h0, n, H, Hp, h);
  std::copy(x0, x0 + 3 * n, x);
  for (int64_t l = 0; l < net.L; ++l) {
    const LayerW<T>& w = net.w[l];
    std::copy(x, x + 3 * n, xs + l * sX);
    for_parts(n, parts, [&](int64_t, int64_t i0, int64_t i1) {
      const int64_t r = i1 - i0;
      for (int64_t i = i0; i < i1; ++i) std::copy(h + i * Hp, h + i * Hp + H, hs + l * sH + i * H);
      gemm<T>(r, Hp, Hp, h + i0 * Hp, Hp, 1, w.w1aT, Hp, P + i0 * Hp, Hp, w.b1);
      gemm<T>(r, Hp, Hp, h + i0 * Hp, Hp, 1, w.w1bT, Hp, Q + i0 * Hp, Hp);
    });
    for_parts(n, parts, [&](int64_t p, int64_t i0, int64_t i1) {
      Scratch<T>& sp = ws.part[p];
      sp.reset();
      EdgeTile<T> tile = sp.tile(n, Hp, false);
      for (int64_t i = i0; i < i1; ++i) {
        T dx[3];
        edge_forward(w, n, Hp, i, x, x0, P, Q, net.range, tile, dx, agg + i * Hp);
        for (int c = 0; c < 3; ++c) xn[3 * i + c] = x[3 * i + c] + dx[c];
      }
      if (l + 1 < net.L) {  // the last layer's node update only feeds the unused h_out
        const int64_t r = i1 - i0;
        T *hr = h + i0 * Hp, *znr = zn + i0 * Hp;
        gemm<T>(r, Hp, Hp, hr, Hp, 1, w.wn1aT, Hp, znr, Hp, w.bn1);
        gemm<T>(r, Hp, Hp, agg + i0 * Hp, Hp, 1, w.wn1bT, Hp, znr, Hp, nullptr, true);
        silu(znr, znr, r * Hp);
        gemm<T>(r, Hp, Hp, znr, Hp, 1, w.wn2T, Hp, hr, Hp, w.bn2, true);
      }
    });
    std::swap(x, xn);
  }
  for (int64_t k = 0; k < 3 * n; ++k) v[k] = x[k] - x0[k];
  remove_mean(v, n);
}

// Gradients of <gv, v> for one molecule: recomputes every layer's edges from hs/xs, writes
// gx [n, 3] and gh0 [n, H], adds the weight gradients of block p to G[p]. Per layer three
// passes over atom blocks: (A) node products; (B) each block's receivers: edge recomputation and
// backward, node-MLP backward and the weight gradients that sum over the block's own atoms;
// then the blocks' partial sums of the sender-side gradients (gQ, gx, gx0) are added in block
// order; (C) the gradient of the layer input h and of W1b (which needs the complete gQ).
template <typename T>
void backward_molecule(const Net<T>& net, GradAcc<T>* const* G, int64_t n, const T* x0, const T* gv,
                       const T* hs, int64_t sH, const T* xs, int64_t sX, T* gx_out, T* gh0_out,
                       Workspace<T>& ws) {
  const int64_t H = net.H, Hp = net.Hp, parts = std::min<int64_t>(static_cast<int64_t>(ws.part.size()), n);
  Scratch<T>& s = ws.mol;
  s.reset();
  T *h = s.take(n * Hp), *P = s.take(n * Hp), *Q = s.take(n * Hp), *gsn = s.take(n * Hp),
    *zn = s.take(n * Hp), *agg = s.take(n * Hp), *gzn = s.take(n * Hp), *gP = s.take(n * Hp),
    *gQ = s.take(n * Hp), *gh = s.take(n * Hp), *ghn = s.take(n * Hp);
  T *gx = s.take(3 * n), *gxn = s.take(3 * n), *gx0 = s.take(3 * n);
  // v = x^L - x^0 minus its mean: the mean removal is a symmetric projection.
  std::copy(gv, gv + 3 * n, gx);
  remove_mean(gx, n);
  for (int64_t k = 0; k < 3 * n; ++k) gx0[k] = -gx[k];
  std::fill(gh, gh + n * Hp, T(0));
  for (int64_t l = net.L - 1; l >= 0; --l) {
    const LayerW<T>& w = net.w[l];
    const bool node = l + 1 < net.L;  // the last layer's h output is unused: no node update
    const T* x = xs + l * sX;
    for_parts(n, parts, [&](int64_t, int64_t i0, int64_t i1) {  // (A)
      const int64_t r = i1 - i0;
      T* hr = h + i0 * Hp;
      load_h(hs + l * sH + i0 * H, r, H, Hp, hr);
      gemm<T>(r, Hp, Hp, hr, Hp, 1, w.w1aT, Hp, P + i0 * Hp, Hp, w.b1);
      gemm<T>(r, Hp, Hp, hr, Hp, 1, w.w1bT, Hp, Q + i0 * Hp, Hp);
      if (node) {
        gemm<T>(r, Hp, Hp, gh + i0 * Hp, Hp, 1, w.wn2, Hp, gsn + i0 * Hp, Hp);
        gemm<T>(r, Hp, Hp, hr, Hp, 1, w.wn1aT, Hp, zn + i0 * Hp, Hp, w.bn1);
      }
    });
    std::copy(gx, gx + 3 * n, gxn);
    for_parts(n, parts, [&](int64_t p, int64_t i0, int64_t i1) {  // (B)
      if (G[p]->buf.empty()) G[p]->init(net.L, Hp);
      LayerG<T>& g = G[p]->g[l];
      BackwardPart<T> b(ws.part[p], n, Hp);
      // Block 0 scatters straight into the molecule's sums, the others into their partials.
      T *gQp = p ? b.gQ : gQ, *gxp = p ? b.gx : gxn, *gx0p = p ? b.gx0 : gx0;
      std::fill(gQp, gQp + n * Hp, T(0));
      if (p) std::fill(gxp, gxp + 3 * n, T(0)), std::fill(gx0p, gx0p + 3 * n, T(0));
      for (int64_t i = i0; i < i1; ++i) {
        T dx[3];
        T* aggi = agg + i * Hp;
        edge_forward(w, n, Hp, i, x, x0, P, Q, net.range, b.tile, dx, aggi);
        if (node) {
          T *zni = zn + i * Hp, *gzni = gzn + i * Hp, *gsni = gsn + i * Hp;
          gemm<T>(1, Hp, Hp, aggi, Hp, 1, w.wn1bT, Hp, zni, Hp, nullptr, true);
          std::copy(gsni, gsni + Hp, gzni);
          silu_backward(zni, gzni, Hp);
          silu(zni, gsni, Hp);  // gsn row i now holds sn_i = SiLU(zn_i)
          gemm<T>(1, Hp, Hp, gzni, Hp, 1, w.wn1b, Hp, b.gagg, Hp);
        }
        edge_backward(w, g, n, Hp, i, net.range, b.tile, gx + 3 * i, node ? b.gagg : nullptr, b.g1, b.g2, gxp,
                      gx0p, gQp, gP + i * Hp);
      }
      const int64_t r = i1 - i0;
      const T *hr = h + i0 * Hp, *gzr = gzn + i0 * Hp;
      gemm<T>(Hp, Hp, r, gP + i0 * Hp, 1, Hp, hr, Hp, g.w1a, Hp, nullptr, true);
      if (node) {
        gemm<T>(Hp, Hp, r, gh + i0 * Hp, 1, Hp, gsn + i0 * Hp, Hp, g.wn2, Hp, nullptr, true);
        gemm<T>(Hp, Hp, r, gzr, 1, Hp, hr, Hp, g.wn1a, Hp, nullptr, true);
        gemm<T>(Hp, Hp, r, gzr, 1, Hp, agg + i0 * Hp, Hp, g.wn1b, Hp, nullptr, true);
        for (int64_t i = i0; i < i1; ++i) {
          add(gh + i * Hp, g.bn2, Hp);
          add(gzn + i * Hp, g.bn1, Hp);
        }
      }
    });
    for (int64_t p = 1; p < parts; ++p) {
      const BackwardPart<T> b(ws.part[p], n, Hp);
      add(b.gQ, gQ, n * Hp);
      add(b.gx, gxn, 3 * n);
      add(b.gx0, gx0, 3 * n);
    }
    for_parts(n, parts, [&](int64_t p, int64_t i0, int64_t i1) {  // (C)
      const int64_t r = i1 - i0;
      const T *hr = h + i0 * Hp, *gQr = gQ + i0 * Hp, *gPr = gP + i0 * Hp;
      T* ghr = ghn + i0 * Hp;
      gemm<T>(Hp, Hp, r, gQr, 1, Hp, hr, Hp, G[p]->g[l].w1b, Hp, nullptr, true);
      if (node) {
        std::copy(gh + i0 * Hp, gh + i1 * Hp, ghr);
        gemm<T>(r, Hp, Hp, gzn + i0 * Hp, Hp, 1, w.wn1a, Hp, ghr, Hp, nullptr, true);
        gemm<T>(r, Hp, Hp, gPr, Hp, 1, w.w1a, Hp, ghr, Hp, nullptr, true);
      } else {
        gemm<T>(r, Hp, Hp, gPr, Hp, 1, w.w1a, Hp, ghr, Hp);
      }
      gemm<T>(r, Hp, Hp, gQr, Hp, 1, w.w1b, Hp, ghr, Hp, nullptr, true);
    });
    std::swap(gh, ghn);
    std::swap(gx, gxn);
  }
  for (int64_t k = 0; k < 3 * n; ++k) gx_out[k] = gx[k] + gx0[k];
  for (int64_t i = 0; i < n; ++i) std::copy(gh + i * Hp, gh + i * Hp + H, gh0_out + i * H);
}

}  // namespace TBG_EGNN_ISA
