// CUDA kernels of tbg::egnn_forward and tbg::egnn_backward (semantics: tbg/nn/reference.py,
// egnn_displacement then remove_mean), float32 and float64, ragged layout.
//
// Design (why it looks like this):
// - Work split. Per layer, everything that is per ATOM (P = W1a h + b1, Q = W1b h, the node MLP
//   and its backward, the weight gradients of W1a/W1b/Wn1/Wn2) is a plain [M, H] x [H, H] GEMM
//   and runs through ATen (cuBLAS) on the current stream. Everything that is per EDGE (O(M*N*H^2)
//   work, all of the cost for N >= ~10) runs in one fused kernel per layer that never writes an
//   edge tensor to global memory: memory stays O(M*H) in both passes.
// - The first edge linear is split by the algebra of issue 3: W1 [h_i, h_j, r, a] + b1 =
//   P_i + Q_j + w_r r + w_a a, so the per-edge first layer is H multiply-adds, not (2H+2)H.
// - Grid: one thread block per tile of TI receiver atoms of one molecule, all senders of that
//   molecule. Tiles are numbered on the device (tile_ptr = cumsum(ceil(n_b / TI)), an ATen cumsum,
//   no host sync) and the grid is the upper bound ceil(M / TI) + B, so the launch needs neither
//   the largest molecule nor any device-to-host copy; surplus blocks exit at once. No work is ever
//   done on padding. The block walks its TI*(n-1) edges (receiver-major, i != j) in chunks of
//   R = 16*RT rows.
// - Per chunk the two H x H edge products (W2, Wc1) are tiled GEMMs over the chunk's edges:
//   256 threads as 16 x 16, each an RT x 4 register tile (4 adjacent columns: 16-byte loads); the
//   edge activations live in shared memory ([R][H] buffers, row pitch H|1 against bank conflicts)
//   and weight tiles are staged through shared memory 16 rows of K at a time, double-buffered with
//   a register prefetch of the next tile (fp32/fp64 FMA; no tensor cores). SiLU, the attention
//   gate, tanh and the coordinate head (w_c2 . SiLU(...)) are fused into the GEMM epilogues (row
//   sums as per-thread partials + 16-lane shuffles). RT (rows per thread: 4, 2 or 1) is the
//   largest whose dynamic shared memory fits the device (opt-in limit raised with
//   cudaFuncSetAttribute), so H up to 256 fits in fp32 and fp64 alike. Keeping the whole weight
//   matrices resident in shared memory was measured slower on an H100 (1 block per SM at H = 128).
// - Aggregation (agg_i = sum_j m_ij, dx_i) is receiver-side: the block owns its receivers, so the
//   sums stay in shared memory (a few shared atomics per column and chunk) and are written once,
//   without global atomics.
// - Backward recomputes each layer's edge activations from h_states / x_states (first the agg of
//   the layer for the node-MLP backward, then the edge backward). Sender-side gradients (dQ_j,
//   coordinate gradients of j, and the gradient of the fixed edge attribute a_ij, which goes
//   straight to the input coordinates) and the per-chunk H x H weight gradients (W2, Wc1) are
//   added to small global buffers with atomicAdd (float4 atomics on sm_90; fp64 atomics need
//   sm_60+); per-block vector gradients (biases, w_att, w_c2, the r/a columns of W1) are reduced in
//   shared memory first. Atomic accumulation makes fp32 results vary between calls at the level
//   of rounding (~1e-6 relative; like torch's own index_add_ on CUDA that the reference uses).
// - mol_ptr is validated on the device (CUDA_KERNEL_ASSERT: starts at 0, non-decreasing, ends at
//   M); the Python layer checks it with a clear message before calling.
// - Measured (H100, bench/RESULTS.md): the edge kernels are latency-bound at 10-20% of the fp32
//   FMA ceiling; the next steps are fewer barriers per chunk and larger per-thread tiles.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "common/constants.h"
#include "common/egnn_args.h"

namespace tbg {
namespace {

constexpr int kThreads = 256;  // 16 x 16 thread grid of the tiled GEMMs
constexpr int kTI = 16;        // receiver atoms per block
constexpr int kKC = 16;        // K rows of a staged weight tile
constexpr int kNC = 64;        // output columns per GEMM tile (16 threads x 4)
constexpr int kPerThread = kKC * kNC / kThreads;  // weight-tile elements each thread stages
static_assert(kKC * kNC % kThreads == 0, "weight tile must split evenly over the threads");
constexpr int kRowScalars = 22;

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }
__device__ __forceinline__ float sqrt_(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_(double v) { return sqrt(v); }

template <typename T>
__device__ __forceinline__ T sigmoid(T v) {
  return T(1) / (T(1) + exp_(-v));
}
template <typename T>
__device__ __forceinline__ T silu(T v) {
  return v * sigmoid(v);
}
template <typename T>
__device__ __forceinline__ T dsilu(T v) {
  const T s = sigmoid(v);
  return s * (T(1) + v * (T(1) - s));
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Shared-memory layout of a block, in elements of T (plus an int area at the end); the same code
// sizes the launch on the host and carves the buffer on the device.
struct SmemLayout {
  int ld = 0;  // row pitch of the [R][H] buffers
  size_t buf[4] = {0, 0, 0, 0}, bs = 0, node = 0, dxs = 0, vec = 0, rows = 0, n_t = 0, n_int = 0;
  __host__ __device__ SmemLayout(int H, int R, int n_buffers) {
    ld = H | 1;
    size_t o = 0;
    for (int b = 0; b < 4; ++b) {
      buf[b] = o;
      if (b < n_buffers) o += size_t(R) * ld;
    }
    bs = o;   o += size_t(2) * kKC * kNC;  // double-buffered weight tiles
    node = o; o += size_t(kTI) * H;      // agg (forward) or dP (backward) of the block's receivers
    dxs = o;  o += size_t(kTI) * 3;
    vec = o;  o += size_t(6) * H + 2;    // backward vector-gradient accumulators
    rows = o; o += size_t(kRowScalars) * R;
    n_t = o;
    n_int = size_t(2) * R;
  }
  template <typename T>
  __host__ __device__ size_t bytes() const {
    return n_t * sizeof(T) + n_int * sizeof(int);
  }
};

template <typename T>
struct EdgeArgs {
  const T* x;   // [M, 3] layer input coordinates
  const T* x0;  // [M, 3] input coordinates of the stack (edge attribute a_ij)
  const T* P;   // [M, H] W1a h + b1
  const T* Q;   // [M, H] W1b h
  const int64_t* mol_ptr;
  const int64_t* tile_ptr;
  int64_t n_mol;
  int H;
  T range;
  const T* wra;  // [2, H]: the r and a columns of W1
  const T* w2t;  // [H, H] W2^T (in, out)
  const T* b2;
  const T* watt;
  const T* batt;  // [1]
  const T* wc1t;  // [H, H] Wc1^T
  const T* bc1;
  const T* wc2;
  // forward outputs
  T* agg;  // [M, H]
  T* dx;   // [M, 3] (nullptr: agg only)
  // backward
  const T* w2;   // [H, H] (out, in)
  const T* wc1;  // [H, H]
  const T* gxo;  // [M, 3] gradient of the layer's output coordinates
  const T* gagg; // [M, H] gradient of agg (from the node MLP backward)
  T *gxl, *gx0a, *gP, *gQ, *gW2, *gWc1, *gb2, *gbc1, *gwc2, *gwatt, *gbatt, *gwra;
};

// C[m][n] = sum_k A(m, k) B[k][n] for m < Mrows, n < N, k < K, tile by tile, calling
// epi(r, m, n, c) for every element (r: the thread's row slot, a compile-time index after
// unrolling). A(m, k) = TA ? A[k * lda + m] : A[m * lda + k] lives in shared memory; B (global or
// shared) is staged through Bs. Every thread of the block must call it.
// Epilogue of block_gemm that adds the tile to a global [., ld] matrix with atomics (the per-chunk
// weight gradients): 4 adjacent columns per float4 atomic on sm_90, one atomic per element elsewhere.
template <typename T>
struct AtomicOut {
  T* out;
  int ld;
};
template <typename E>
inline constexpr bool kIsAtomicOut = false;
template <typename T>
inline constexpr bool kIsAtomicOut<AtomicOut<T>> = true;

// Four adjacent values from 16-byte aligned shared memory (one 16-byte load for float).
template <typename T>
__device__ __forceinline__ void load4(const T* src, T (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 q = *reinterpret_cast<const float4*>(src);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int c = 0; c < 4; ++c) v[c] = src[c];
  }
}

template <typename T, int RT, bool TA, typename Epi>
__device__ __forceinline__ void block_gemm(int Mrows, int N, int K, const T* A, int lda, const T* B, int ldb,
                                           T* Bs, Epi&& epi) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  for (int m0 = 0; m0 < Mrows; m0 += 16 * RT) {
    int arow[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) arow[r] = min(m0 + ty * RT + r, Mrows - 1);  // clamped: always a valid read
    for (int n0 = 0; n0 < N; n0 += kNC) {
      T acc[RT][4];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = T(0);
      // Software pipeline: the next K tile of B is loaded into registers while this one is
      // multiplied, then stored to the other half of Bs (one barrier per tile).
      T pre[kPerThread];
      auto fetch = [&](int k0) {
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) {
          const int idx = threadIdx.x + q * kThreads, k = k0 + idx / kNC, n = n0 + idx % kNC;
          pre[q] = (k < K && n < N) ? B[size_t(k) * ldb + n] : T(0);
        }
      };
      auto store = [&](T* dst) {
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) dst[threadIdx.x + q * kThreads] = pre[q];
      };
      __syncthreads();  // Bs is free (and A is complete on entry)
      fetch(0);
      store(Bs);
      __syncthreads();
      for (int k0 = 0, half = 0; k0 < K; k0 += kKC, half ^= 1) {
        const bool more = k0 + kKC < K;
        if (more) fetch(k0 + kKC);
        const T* bt = Bs + half * (kKC * kNC);
        const int kmax = min(kKC, K - k0);
        if (kmax == kKC) {
#pragma unroll
          for (int kk = 0; kk < kKC; ++kk) {
            T a[RT], b[4];
#pragma unroll
            for (int r = 0; r < RT; ++r)
              a[r] = TA ? A[size_t(k0 + kk) * lda + arow[r]] : A[size_t(arow[r]) * lda + k0 + kk];
            load4(bt + kk * kNC + tx * 4, b);
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
          }
        } else {
          for (int kk = 0; kk < kmax; ++kk) {
            T a[RT], b[4];
#pragma unroll
            for (int r = 0; r < RT; ++r)
              a[r] = TA ? A[size_t(k0 + kk) * lda + arow[r]] : A[size_t(arow[r]) * lda + k0 + kk];
            load4(bt + kk * kNC + tx * 4, b);
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
              for (int c = 0; c < 4; ++c) acc[r][c] = fma(a[r], b[c], acc[r][c]);
          }
        }
        if (more) store(Bs + (half ^ 1) * (kKC * kNC));
        __syncthreads();
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const int m = m0 + ty * RT + r, n = n0 + tx * 4;
        if (m >= Mrows) continue;
        if constexpr (kIsAtomicOut<std::decay_t<Epi>>) {
          T* dst = epi.out + size_t(m) * epi.ld + n;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
          if constexpr (std::is_same_v<T, float>) {
            if (n + 3 < N && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
              atomicAdd(reinterpret_cast<float4*>(dst), make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
              continue;
            }
          }
#endif
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (n + c < N) atomicAdd(dst + c, acc[r][c]);
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (n + c < N) epi(r, m, n + c, acc[r][c]);
        }
      }
    }
  }
  __syncthreads();  // results visible, Bs free
}

// The block's tile: molecule start, size n, first receiver (global) and receiver count.
struct Tile {
  int64_t start, i0;
  int n, ti;
};

__device__ __forceinline__ bool find_tile(const int64_t* mol_ptr, const int64_t* tile_ptr, int64_t n_mol,
                                          Tile& t) {
  const int64_t tile = blockIdx.x;
  if (tile >= tile_ptr[n_mol]) return false;
  int64_t lo = 0, hi = n_mol - 1;  // largest b with tile_ptr[b] <= tile
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_ptr[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  const int64_t k = tile - tile_ptr[lo];
  t.start = mol_ptr[lo];
  t.n = int(mol_ptr[lo + 1] - t.start);
  t.i0 = t.start + k * kTI;
  const int64_t left = t.n - k * kTI;
  t.ti = int(left < kTI ? left : kTI);
  return true;
}

// Sums each thread's per-row partials over the 16 column lanes of its row slots (lanes of one ty
// share rows) and calls write(row, sum) once per row.
template <typename T, int RT, typename W>
__device__ __forceinline__ void row_reduce(T (&part)[RT], W&& write) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    T v = part[r];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (tx == 0) write(ty * RT + r, v);
  }
}

// Per-row scalars of a chunk, in the rows area ([kRowScalars][R]).
enum RowField { kR = 0, kA, kSq, kS, kD, kN = kD + 3, kD0 = kN + 3, kGn = kD0 + 3, kPhi = kGn + 3, kGate, kGp,
                kGsig, kGr, kGa };
static_assert(kGa < kRowScalars, "row scalar area too small");

// Geometry of the chunk's rows and the first edge layer e1 = SiLU(P_i + Q_j + w_r r + w_a a) into
// buf (invalid rows zero). ints: [0, R) local receiver index (-1: invalid row), [R, 2R) sender j.
template <typename T, int RT>
__device__ __forceinline__ void chunk_prologue(const EdgeArgs<T>& p, const Tile& t, int e0, int n_edges, T* rows,
                                               int* ints, T* buf, int ld) {
  constexpr int R = 16 * RT;
  const int nb = t.n - 1, H = p.H;
  for (int row = threadIdx.x; row < R; row += kThreads) {
    const int e = e0 + row;
    if (e < n_edges) {
      const int ii = e / nb, k = e % nb;
      const int il = int(t.i0 - t.start) + ii;
      const int64_t i = t.i0 + ii, j = t.start + (k < il ? k : k + 1);
      T d[3], d0[3], r = 0, a = 0;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        d[c] = p.x[i * 3 + c] - p.x[j * 3 + c];
        d0[c] = p.x0[i * 3 + c] - p.x0[j * 3 + c];
        r += d[c] * d[c];
        a += d0[c] * d0[c];
      }
      const T sq = sqrt_(r + T(kEdgeEps)), s = sq + T(1);
      rows[kR * R + row] = r;
      rows[kA * R + row] = a;
      rows[kSq * R + row] = sq;
      rows[kS * R + row] = s;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        rows[(kD + c) * R + row] = d[c];
        rows[(kN + c) * R + row] = d[c] / s;
        rows[(kD0 + c) * R + row] = d0[c];
      }
      ints[row] = ii;
      ints[R + row] = int(j - t.start);
    } else {
      ints[row] = -1;
      ints[R + row] = 0;
    }
  }
  __syncthreads();
  const T* wr = p.wra;
  const T* wa = p.wra + H;
  for (int idx = threadIdx.x; idx < R * H; idx += kThreads) {
    const int row = idx / H, k = idx % H;
    T v = T(0);
    if (ints[row] >= 0) {
      const int64_t i = t.i0 + ints[row], j = t.start + ints[R + row];
      v = silu(p.P[i * H + k] + p.Q[j * H + k] + wr[k] * rows[kR * R + row] + wa[k] * rows[kA * R + row]);
    }
    buf[size_t(row) * ld + k] = v;
  }
  __syncthreads();
}

// m = SiLU(e1 W2^T + b2) * sigmoid(w_att . SiLU(...) + b_att): zb gets z (pre-activation), mb gets m
// (zb == mb: m only); the gates go to rows[kGate]. The gate's dot product is summed in the GEMM
// epilogue (per-thread partials, then 16-lane shuffles), not by a separate pass over the rows.
template <typename T, int RT>
__device__ __forceinline__ void edge_message(const EdgeArgs<T>& p, const T* e1, T* zb, T* mb, T* Bs, T* rows,
                                             int ld) {
  constexpr int R = 16 * RT;
  const int H = p.H;
  T part[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) part[r] = T(0);
  block_gemm<T, RT, false>(R, H, H, e1, ld, p.w2t, H, Bs, [&](int r, int m, int n, T c) {
    const T z = c + p.b2[n], m0 = silu(z);
    if (zb != mb) zb[size_t(m) * ld + n] = z;
    mb[size_t(m) * ld + n] = m0;
#pragma unroll
    for (int q = 0; q < RT; ++q)
      if (q == r) part[q] += p.watt[n] * m0;
  });
  const T batt = p.batt[0];
  row_reduce<T, RT>(part, [&](int row, T v) { rows[kGate * R + row] = sigmoid(v + batt); });
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * H; idx += kThreads) {
    const int row = idx / H, k = idx % H;
    mb[size_t(row) * ld + k] *= rows[kGate * R + row];
  }
  __syncthreads();
}

// phi = tanh(w_c2 . SiLU(m Wc1^T + bc1)) per row into rows[kPhi]; with yb, y = m Wc1^T + bc1 is kept.
template <typename T, int RT>
__device__ __forceinline__ void edge_phi(const EdgeArgs<T>& p, const T* mb, T* yb, T* Bs, T* rows, int ld) {
  constexpr int R = 16 * RT;
  const int H = p.H;
  T pacc[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) pacc[r] = T(0);
  block_gemm<T, RT, false>(R, H, H, mb, ld, p.wc1t, H, Bs, [&](int r, int m, int n, T c) {
    const T y = c + p.bc1[n];
    if (yb != nullptr) yb[size_t(m) * ld + n] = y;
#pragma unroll
    for (int q = 0; q < RT; ++q)
      if (q == r) pacc[q] += p.wc2[n] * silu(y);
  });
  row_reduce<T, RT>(pacc, [&](int row, T v) { rows[kPhi * R + row] = tanh_(v); });
  __syncthreads();
}

// Runs f(k, r0, r1) for every column k < H and a contiguous row range [r0, r1) of the chunk, all
// threads busy also for small H: (rows / G) x H work items with G = 256 / H row groups. Partial sums
// are flushed with shared-memory atomics (G owners per column).
template <typename F>
__device__ __forceinline__ void column_pass(int H, int R, F&& f) {
  const int G = H >= kThreads ? 1 : kThreads / H;
  for (int idx = threadIdx.x; idx < G * H; idx += kThreads) {
    const int k = idx % H, g = idx / H;
    f(k, g * R / G, (g + 1) * R / G);
  }
}

// Adds the running sum s of receiver `cur` to node[cur][k] and starts the next receiver.
template <typename T>
__device__ __forceinline__ void flush_receiver(T* node, int H, int k, int& cur, int ii, T& s) {
  if (ii == cur) return;
  if (cur >= 0) atomicAdd(node + cur * H + k, s);
  cur = ii;
  s = T(0);
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) egnn_edge_forward_kernel(const EdgeArgs<T> p) {
  constexpr int R = 16 * RT;
  Tile t;
  if (!find_tile(p.mol_ptr, p.tile_ptr, p.n_mol, t)) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int H = p.H;
  const SmemLayout L(H, R, 2);
  T *b1 = smem + L.buf[0], *b2 = smem + L.buf[1], *Bs = smem + L.bs, *agg = smem + L.node, *dxs = smem + L.dxs,
    *rows = smem + L.rows;
  int* ints = reinterpret_cast<int*>(smem + L.n_t);
  for (int idx = threadIdx.x; idx < kTI * H; idx += kThreads) agg[idx] = T(0);
  for (int idx = threadIdx.x; idx < kTI * 3; idx += kThreads) dxs[idx] = T(0);
  const int n_edges = t.ti * (t.n - 1);
  for (int e0 = 0; e0 < n_edges; e0 += R) {
    chunk_prologue<T, RT>(p, t, e0, n_edges, rows, ints, b1, L.ld);
    edge_message<T, RT>(p, b1, b2, b2, Bs, rows, L.ld);
    if (p.dx != nullptr) edge_phi<T, RT>(p, b2, nullptr, Bs, rows, L.ld);
    // Receiver-side sums; the rows of one receiver are contiguous.
    column_pass(H, R, [&](int k, int r0, int r1) {
      int cur = -1;
      T s = 0;
      for (int row = r0; row < r1; ++row) {
        flush_receiver(agg, H, k, cur, ints[row], s);
        if (cur >= 0) s += b2[size_t(row) * L.ld + k];
      }
      flush_receiver(agg, H, k, cur, -1, s);
    });
    if (p.dx != nullptr)
      for (int row = threadIdx.x; row < R; row += kThreads)
        if (ints[row] >= 0)
#pragma unroll
          for (int c = 0; c < 3; ++c)
            atomicAdd(dxs + ints[row] * 3 + c, rows[(kN + c) * R + row] * rows[kPhi * R + row] * p.range);
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < t.ti * H; idx += kThreads) p.agg[t.i0 * H + idx] = agg[idx];
  if (p.dx != nullptr)
    for (int idx = threadIdx.x; idx < t.ti * 3; idx += kThreads) p.dx[t.i0 * 3 + idx] = dxs[idx];
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) egnn_edge_backward_kernel(const EdgeArgs<T> p) {
  constexpr int R = 16 * RT;
  Tile t;
  if (!find_tile(p.mol_ptr, p.tile_ptr, p.n_mol, t)) return;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int H = p.H;
  const SmemLayout L(H, R, 4);
  const int ld = L.ld;
  // b1: e1, later dL/du; b2: z, later dL/dz; b3: m, later dL/dm; b4: y, later dL/dy.
  T *b1 = smem + L.buf[0], *b2 = smem + L.buf[1], *b3 = smem + L.buf[2], *b4 = smem + L.buf[3];
  T *Bs = smem + L.bs, *gP = smem + L.node, *rows = smem + L.rows;
  T *acc_b2 = smem + L.vec, *acc_bc1 = acc_b2 + H, *acc_wc2 = acc_bc1 + H, *acc_watt = acc_wc2 + H,
    *acc_wr = acc_watt + H, *acc_wa = acc_wr + H, *acc_batt = acc_wa + H;
  int* ints = reinterpret_cast<int*>(smem + L.n_t);
  for (int idx = threadIdx.x; idx < kTI * H; idx += kThreads) gP[idx] = T(0);
  for (int idx = threadIdx.x; idx < 6 * H + 1; idx += kThreads) acc_b2[idx] = T(0);
  const int n_edges = t.ti * (t.n - 1);
  const T* wr = p.wra;
  const T* wa = p.wra + H;
  for (int e0 = 0; e0 < n_edges; e0 += R) {
    chunk_prologue<T, RT>(p, t, e0, n_edges, rows, ints, b1, ld);
    edge_message<T, RT>(p, b1, b2, b3, Bs, rows, ld);
    edge_phi<T, RT>(p, b3, b4, Bs, rows, ld);
    // Coordinate head: x_i' = x_i + sum_j n_ij phi_ij range.
    for (int row = threadIdx.x; row < R; row += kThreads) {
      T gp = 0;
      if (ints[row] >= 0) {
        const int64_t i = t.i0 + ints[row];
        const T phi = rows[kPhi * R + row];
        T gphi = 0;
#pragma unroll
        for (int c = 0; c < 3; ++c) {
          const T g = p.gxo[i * 3 + c];
          gphi += g * rows[(kN + c) * R + row];
          rows[(kGn + c) * R + row] = p.range * phi * g;
        }
        gp = p.range * gphi * (T(1) - phi * phi);
      } else {
#pragma unroll
        for (int c = 0; c < 3; ++c) rows[(kGn + c) * R + row] = T(0);
      }
      rows[kGp * R + row] = gp;
    }
    __syncthreads();
    column_pass(H, R, [&](int k, int r0, int r1) {
      T swc2 = 0, sbc1 = 0;
      for (int row = r0; row < r1; ++row) {
        const T y = b4[size_t(row) * ld + k], gp = rows[kGp * R + row];
        const T sg = sigmoid(y);
        swc2 += gp * y * sg;
        const T gy = gp * p.wc2[k] * sg * (T(1) + y * (T(1) - sg));
        b4[size_t(row) * ld + k] = gy;
        sbc1 += gy;
      }
      atomicAdd(acc_wc2 + k, swc2);
      atomicAdd(acc_bc1 + k, sbc1);
    });
    __syncthreads();
    // dWc1 += dy^T m, then dm = dy Wc1 + dagg_i.
    block_gemm<T, RT, true>(H, H, R, b4, ld, b3, ld, Bs, AtomicOut<T>{p.gWc1, H});
    // Attention gate m = m0 * g, g = sigmoid(w_att . m0 + b_att): dm . m0 summed in the epilogue.
    T part[RT], part2[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) part[r] = part2[r] = T(0);
    block_gemm<T, RT, false>(R, H, H, b4, ld, p.wc1, H, Bs, [&](int r, int m, int n, T c) {
      const int ii = ints[m];
      const T gm = ii >= 0 ? c + p.gagg[(t.i0 + ii) * H + n] : T(0);
      b3[size_t(m) * ld + n] = gm;
#pragma unroll
      for (int q = 0; q < RT; ++q)
        if (q == r) part[q] += gm * silu(b2[size_t(m) * ld + n]);
    });
    row_reduce<T, RT>(part, [&](int row, T v) {
      const T g = rows[kGate * R + row];
      rows[kGsig * R + row] = v * g * (T(1) - g);
    });
    __syncthreads();
    column_pass(H, R, [&](int k, int r0, int r1) {
      T swatt = 0, sb2 = 0;
      for (int row = r0; row < r1; ++row) {
        const T z = b2[size_t(row) * ld + k], gm = b3[size_t(row) * ld + k];
        const T g = rows[kGate * R + row], gsig = rows[kGsig * R + row];
        const T sg = sigmoid(z);
        swatt += gsig * z * sg;
        const T gz = (gm * g + gsig * p.watt[k]) * sg * (T(1) + z * (T(1) - sg));
        b2[size_t(row) * ld + k] = gz;
        sb2 += gz;
      }
      atomicAdd(acc_watt + k, swatt);
      atomicAdd(acc_b2 + k, sb2);
    });
    if (threadIdx.x == 0) {
      T s = 0;
      for (int row = 0; row < R; ++row) s += rows[kGsig * R + row];
      acc_batt[0] += s;
    }
    __syncthreads();
    // dW2 += dz^T e1, then du = (dz W2) * SiLU'(u) with u recomputed.
    block_gemm<T, RT, true>(H, H, R, b2, ld, b1, ld, Bs, AtomicOut<T>{p.gW2, H});
#pragma unroll
    for (int r = 0; r < RT; ++r) part[r] = part2[r] = T(0);
    block_gemm<T, RT, false>(R, H, H, b2, ld, p.w2, H, Bs, [&](int r, int m, int n, T c) {
      const int ii = ints[m];
      T gu = T(0);
      if (ii >= 0) {
        const int64_t i = t.i0 + ii, j = t.start + ints[R + m];
        const T u = p.P[i * H + n] + p.Q[j * H + n] + wr[n] * rows[kR * R + m] + wa[n] * rows[kA * R + m];
        gu = c * dsilu(u);
      }
      b1[size_t(m) * ld + n] = gu;
#pragma unroll
      for (int q = 0; q < RT; ++q)
        if (q == r) {
          part[q] += gu * wr[n];
          part2[q] += gu * wa[n];
        }
    });
    row_reduce<T, RT>(part, [&](int row, T v) { rows[kGr * R + row] = v; });
    row_reduce<T, RT>(part2, [&](int row, T v) { rows[kGa * R + row] = v; });
    // du -> dP_i (block-owned receivers), dQ_j (atomics), w_r / w_a columns.
    column_pass(H, R, [&](int k, int r0, int r1) {
      T swr = 0, swa = 0, s = 0;
      int cur = -1;
      for (int row = r0; row < r1; ++row) {
        flush_receiver(gP, H, k, cur, ints[row], s);
        if (cur < 0) continue;
        const T gu = b1[size_t(row) * ld + k];
        swr += gu * rows[kR * R + row];
        swa += gu * rows[kA * R + row];
        s += gu;
        atomicAdd(p.gQ + (t.start + ints[R + row]) * H + k, gu);
      }
      flush_receiver(gP, H, k, cur, -1, s);
      atomicAdd(acc_wr + k, swr);
      atomicAdd(acc_wa + k, swa);
    });
    // Coordinates: through r_ij and n_ij of this layer, and through a_ij of the input.
    for (int row = threadIdx.x; row < R; row += kThreads) {
      if (ints[row] < 0) continue;
      const int64_t i = t.i0 + ints[row], j = t.start + ints[R + row];
      const T s = rows[kS * R + row], sq = rows[kSq * R + row], gr = rows[kGr * R + row], ga = rows[kGa * R + row];
      T gnd = 0;
#pragma unroll
      for (int q = 0; q < 3; ++q) gnd += rows[(kGn + q) * R + row] * rows[(kD + q) * R + row];
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const T d = rows[(kD + c) * R + row];
        const T gd = T(2) * gr * d + rows[(kGn + c) * R + row] / s - d * gnd / (s * s * sq);
        const T gd0 = T(2) * ga * rows[(kD0 + c) * R + row];
        atomicAdd(p.gxl + i * 3 + c, gd);
        atomicAdd(p.gxl + j * 3 + c, -gd);
        atomicAdd(p.gx0a + i * 3 + c, gd0);
        atomicAdd(p.gx0a + j * 3 + c, -gd0);
      }
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < t.ti * H; idx += kThreads) p.gP[t.i0 * H + idx] = gP[idx];
  for (int k = threadIdx.x; k < H; k += kThreads) {
    atomicAdd(p.gb2 + k, acc_b2[k]);
    atomicAdd(p.gbc1 + k, acc_bc1[k]);
    atomicAdd(p.gwc2 + k, acc_wc2[k]);
    atomicAdd(p.gwatt + k, acc_watt[k]);
    atomicAdd(p.gwra + k, acc_wr[k]);
    atomicAdd(p.gwra + H + k, acc_wa[k]);
  }
  if (threadIdx.x == 0) atomicAdd(p.gbatt, acc_batt[0]);
}

// out = v - (mean of v over the molecule's atoms), one block per molecule.
template <typename T>
__global__ void remove_mean_kernel(const T* v, T* out, const int64_t* mol_ptr, int64_t n_mol) {
  __shared__ T part[3][kThreads / 32];
  const int64_t b = blockIdx.x;
  const int64_t start = mol_ptr[b], end = mol_ptr[b + 1];
  T s[3] = {0, 0, 0};
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x)
    for (int c = 0; c < 3; ++c) s[c] += v[i * 3 + c];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int c = 0; c < 3; ++c) {
    const T w = warp_sum(s[c]);
    if (lane == 0) part[c][warp] = w;
  }
  __syncthreads();
  T mean[3];
  for (int c = 0; c < 3; ++c) {
    T w = 0;
    for (int q = 0; q < kThreads / 32; ++q) w += part[c][q];
    mean[c] = end > start ? w / T(end - start) : T(0);
  }
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x)
    for (int c = 0; c < 3; ++c) out[i * 3 + c] = v[i * 3 + c] - mean[c];
}

// mol_ptr validity on the device (no host sync): start 0, non-decreasing, end M.
__global__ void check_mol_ptr_kernel(const int64_t* mol_ptr, int64_t n_mol, int64_t M) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b <= n_mol; b += int64_t(gridDim.x) * blockDim.x) {
    CUDA_KERNEL_ASSERT(b > 0 || mol_ptr[0] == 0);
    CUDA_KERNEL_ASSERT(b == 0 || mol_ptr[b] >= mol_ptr[b - 1]);
    CUDA_KERNEL_ASSERT(b < n_mol || mol_ptr[n_mol] == M);
  }
}

// ---- host side --------------------------------------------------------------------------------

// Everything a layer's edge kernels need that depends on the weights only, prepared once per call.
struct LayerWeights {
  at::Tensor w2t, wc1t, wra;  // [L, H, H], [L, H, H], [L, 2, H]
};

LayerWeights prepare(const EGNNWeights& w) {
  const int64_t H = w.hidden;
  return {w.w2.transpose(1, 2).contiguous(), w.wc1.transpose(1, 2).contiguous(),
          w.w1.narrow(2, 2 * H, 2).transpose(1, 2).contiguous()};
}

struct Launch {
  int64_t grid = 0;
  at::Tensor tile_ptr;
};

Launch plan(const at::Tensor& mol_ptr, int64_t M) {
  const int64_t n_mol = mol_ptr.size(0) - 1;
  Launch l;
  if (n_mol > 0) {
    check_mol_ptr_kernel<<<int((n_mol + kThreads) / kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mol_ptr.data_ptr<int64_t>(), n_mol, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor tiles = at::div(mol_ptr.diff() + (kTI - 1), kTI, "floor");
  l.tile_ptr = at::cat({at::zeros({1}, mol_ptr.options()), at::cumsum(tiles, 0)});
  l.grid = (M + kTI - 1) / kTI + n_mol;  // >= sum_b ceil(n_b / kTI); surplus blocks exit
  return l;
}

template <typename T, int RT>
bool try_launch(bool backward, const EdgeArgs<T>& a, int64_t grid, int max_smem, cudaStream_t stream) {
  const size_t bytes = SmemLayout(a.H, 16 * RT, backward ? 4 : 2).bytes<T>();
  if (bytes > size_t(max_smem)) return false;
  auto kernel = backward ? egnn_edge_backward_kernel<T, RT> : egnn_edge_forward_kernel<T, RT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  kernel<<<unsigned(grid), kThreads, bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// Runs the forward (agg and, with a.dx, dx) or backward edge kernel of one layer with the most
// rows per chunk that the device's shared memory allows.
template <typename T>
void launch_edges(bool backward, const EdgeArgs<T>& a, const Launch& l) {
  if (l.grid == 0) return;
  TORCH_CHECK(l.grid < (int64_t(1) << 31), "egnn (CUDA): too many atoms for one launch");
  int dev = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t g = l.grid;
  if (try_launch<T, 4>(backward, a, g, max_smem, stream) || try_launch<T, 2>(backward, a, g, max_smem, stream) ||
      try_launch<T, 1>(backward, a, g, max_smem, stream))
    return;
  TORCH_CHECK(false, "egnn (CUDA): hidden size H = ", a.H, " needs ",
              SmemLayout(a.H, 16, backward ? 4 : 2).bytes<T>(),
              " bytes of shared memory per block, more than the ", max_smem, " this GPU allows");
}

void remove_mean(const at::Tensor& v, at::Tensor& out, const at::Tensor& mol_ptr) {
  const int64_t n_mol = mol_ptr.size(0) - 1;
  if (n_mol == 0) return;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "tbg_remove_mean", [&] {
    remove_mean_kernel<scalar_t><<<unsigned(n_mol), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mol_ptr.data_ptr<int64_t>(), n_mol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The per-layer edge arguments shared by both passes.
template <typename T>
EdgeArgs<T> edge_args(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& P, const at::Tensor& Q,
                      const at::Tensor& mol_ptr, const Launch& l, const EGNNWeights& w, const LayerWeights& lw,
                      int64_t layer, double range) {
  EdgeArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.x0 = x0.data_ptr<T>();
  a.P = P.data_ptr<T>();
  a.Q = Q.data_ptr<T>();
  a.mol_ptr = mol_ptr.data_ptr<int64_t>();
  a.tile_ptr = l.tile_ptr.data_ptr<int64_t>();
  a.n_mol = mol_ptr.size(0) - 1;
  a.H = int(w.hidden);
  a.range = T(range);
  a.wra = lw.wra[layer].data_ptr<T>();
  a.w2t = lw.w2t[layer].data_ptr<T>();
  a.b2 = w.b2[layer].data_ptr<T>();
  a.watt = w.watt[layer].data_ptr<T>();
  a.batt = w.batt.data_ptr<T>() + layer;
  a.wc1t = lw.wc1t[layer].data_ptr<T>();
  a.bc1 = w.bc1[layer].data_ptr<T>();
  a.wc2 = w.wc2[layer].data_ptr<T>();
  a.w2 = w.w2[layer].data_ptr<T>();
  a.wc1 = w.wc1[layer].data_ptr<T>();
  return a;
}

// P = W1a h + b1, Q = W1b h of one layer.
std::pair<at::Tensor, at::Tensor> node_products(const at::Tensor& h, const EGNNWeights& w, int64_t layer) {
  const int64_t H = w.hidden;
  const at::Tensor w1 = w.w1[layer];
  return {at::addmm(w.b1[layer], h, w1.narrow(1, 0, H).t()), at::mm(h, w1.narrow(1, H, H).t())};
}

// The agg of one layer (recomputed in the backward pass) or agg and dx (forward).
at::Tensor layer_edges(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& P, const at::Tensor& Q,
                       const at::Tensor& mol_ptr, const Launch& l, const EGNNWeights& w, const LayerWeights& lw,
                       int64_t layer, double range, at::Tensor* dx) {
  at::Tensor agg = at::empty_like(P);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tbg_egnn_edges", [&] {
    EdgeArgs<scalar_t> a = edge_args<scalar_t>(x, x0, P, Q, mol_ptr, l, w, lw, layer, range);
    a.agg = agg.data_ptr<scalar_t>();
    a.dx = dx != nullptr ? dx->data_ptr<scalar_t>() : nullptr;
    launch_edges<scalar_t>(false, a, l);
  });
  return agg;
}

EGNNWeights weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& watt, const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1,
                    const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2,
                    const at::Tensor& bn2) {
  return {w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2};
}

void check_cuda(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel got tensors on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> egnn_forward_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& mol_ptr, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& watt, const at::Tensor& batt, const at::Tensor& wc1,
    const at::Tensor& bc1, const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2,
    const at::Tensor& bn2, double coords_range) {
  check_cuda("egnn_forward", x);
  const EGNNWeights w = check_egnn_args("egnn_forward", x, h0, mol_ptr,
                                        weights(w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t L = w.n_layers, M = x.size(0), H = w.hidden;
  const double range = coords_range;  // per-layer factor (the module passes coords_range / L)
  const LayerWeights lw = prepare(w);
  const Launch l = plan(mol_ptr, M);
  at::Tensor h_states = at::empty({L, M, H}, x.options()), x_states = at::empty({L, M, 3}, x.options());
  at::Tensor h = h0, xl = x;
  for (int64_t layer = 0; layer < L; ++layer) {
    h_states[layer].copy_(h);
    x_states[layer].copy_(xl);
    const auto [P, Q] = node_products(h, w, layer);
    at::Tensor dx = at::empty_like(x);
    const at::Tensor agg = layer_edges(xl, x, P, Q, mol_ptr, l, w, lw, layer, range, &dx);
    const at::Tensor q = at::silu(at::addmm(w.bn1[layer], at::cat({h, agg}, 1), w.wn1[layer].t()));
    h = h + at::addmm(w.bn2[layer], q, w.wn2[layer].t());
    xl = xl + dx;
  }
  at::Tensor v = at::empty_like(x);
  remove_mean(xl - x, v, mol_ptr);
  return {v, h_states, x_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
egnn_backward_cuda(const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& mol_ptr,
                   const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                   const at::Tensor& watt, const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1,
                   const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2,
                   const at::Tensor& bn2, const at::Tensor& h_states, const at::Tensor& x_states,
                   double coords_range) {
  check_cuda("egnn_backward", x);
  const EGNNWeights w = check_egnn_args("egnn_backward", x, h0, mol_ptr,
                                        weights(w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2));
  const int64_t L = w.n_layers, M = x.size(0), H = w.hidden;
  TORCH_CHECK(grad_v.sizes() == x.sizes() && grad_v.scalar_type() == x.scalar_type() &&
                  grad_v.device() == x.device(),
              "egnn_backward: grad_v must match x (", x.sizes(), ", ", x.scalar_type(), ", ", x.device(), "), got ",
              grad_v.sizes(), ", ", grad_v.scalar_type(), ", ", grad_v.device());
  TORCH_CHECK(h_states.sizes() == at::IntArrayRef({L, M, H}) && x_states.sizes() == at::IntArrayRef({L, M, 3}) &&
                  h_states.scalar_type() == x.scalar_type() && x_states.scalar_type() == x.scalar_type() &&
                  h_states.device() == x.device() && x_states.device() == x.device(),
              "egnn_backward: h_states must be [L, M, H] = [", L, ", ", M, ", ", H, "] and x_states [L, M, 3], ",
              "matching x in dtype and device; got ", h_states.sizes(), " and ", x_states.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor hs = h_states.contiguous(), xs = x_states.contiguous();
  const double range = coords_range;  // per-layer factor (the module passes coords_range / L)
  const LayerWeights lw = prepare(w);
  const Launch l = plan(mol_ptr, M);

  // v = remove_mean(x_L - x): the projection is symmetric, so dL/dx_L = remove_mean(grad_v).
  at::Tensor gdisp = at::empty_like(x);
  remove_mean(grad_v.contiguous(), gdisp, mol_ptr);
  at::Tensor gx = gdisp.clone(), gh = at::zeros_like(h0), gx0a = at::zeros_like(x);
  at::Tensor gw1 = at::zeros_like(w1), gb1 = at::zeros_like(b1), gw2 = at::zeros_like(w2), gb2 = at::zeros_like(b2),
             gwatt = at::zeros_like(watt), gbatt = at::zeros_like(batt), gwc1 = at::zeros_like(wc1),
             gbc1 = at::zeros_like(bc1), gwc2 = at::zeros_like(wc2), gwn1 = at::zeros_like(wn1),
             gbn1 = at::zeros_like(bn1), gwn2 = at::zeros_like(wn2), gbn2 = at::zeros_like(bn2);
  at::Tensor gwra = at::zeros({L, 2, H}, x.options());
  for (int64_t layer = L - 1; layer >= 0; --layer) {
    const at::Tensor h = hs[layer], xl = xs[layer];
    const auto [P, Q] = node_products(h, w, layer);
    const at::Tensor agg = layer_edges(xl, x, P, Q, mol_ptr, l, w, lw, layer, range, nullptr);
    // Node MLP: h' = h + Wn2 SiLU(Wn1 [h, agg] + bn1) + bn2.
    const at::Tensor hin = at::cat({h, agg}, 1);
    const at::Tensor pre = at::addmm(w.bn1[layer], hin, w.wn1[layer].t());
    const at::Tensor q = at::silu(pre);
    gwn2[layer].copy_(at::mm(gh.t(), q));
    gbn2[layer].copy_(gh.sum(0));
    const at::Tensor gpre = at::silu_backward(at::mm(gh, w.wn2[layer]), pre);
    gwn1[layer].copy_(at::mm(gpre.t(), hin));
    gbn1[layer].copy_(gpre.sum(0));
    const at::Tensor ghin = at::mm(gpre, w.wn1[layer]);
    const at::Tensor gagg = ghin.narrow(1, H, H).contiguous();
    // Edges.
    at::Tensor gxl = gx.clone(), gP = at::empty_like(P), gQ = at::zeros_like(Q);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "tbg_egnn_edges_backward", [&] {
      EdgeArgs<scalar_t> a = edge_args<scalar_t>(xl, x, P, Q, mol_ptr, l, w, lw, layer, range);
      a.gxo = gx.data_ptr<scalar_t>();
      a.gagg = gagg.data_ptr<scalar_t>();
      a.gxl = gxl.data_ptr<scalar_t>();
      a.gx0a = gx0a.data_ptr<scalar_t>();
      a.gP = gP.data_ptr<scalar_t>();
      a.gQ = gQ.data_ptr<scalar_t>();
      a.gW2 = gw2[layer].data_ptr<scalar_t>();
      a.gWc1 = gwc1[layer].data_ptr<scalar_t>();
      a.gb2 = gb2[layer].data_ptr<scalar_t>();
      a.gbc1 = gbc1[layer].data_ptr<scalar_t>();
      a.gwc2 = gwc2[layer].data_ptr<scalar_t>();
      a.gwatt = gwatt[layer].data_ptr<scalar_t>();
      a.gbatt = gbatt.data_ptr<scalar_t>() + layer;
      a.gwra = gwra[layer].data_ptr<scalar_t>();
      launch_edges<scalar_t>(true, a, l);
    });
    // First edge linear: P = W1a h + b1, Q = W1b h.
    at::Tensor gw1l = gw1[layer];
    gw1l.narrow(1, 0, H).copy_(at::mm(gP.t(), h));
    gw1l.narrow(1, H, H).copy_(at::mm(gQ.t(), h));
    gb1[layer].copy_(gP.sum(0));
    const at::Tensor w1l = w.w1[layer];
    gh = gh + ghin.narrow(1, 0, H) + at::mm(gP, w1l.narrow(1, 0, H)) + at::mm(gQ, w1l.narrow(1, H, H));
    gx = gxl;
  }
  gw1.narrow(2, 2 * H, 2).copy_(gwra.transpose(1, 2));
  at::Tensor grad_x = gx - gdisp + gx0a;
  return {grad_x, gh, gw1, gb1, gw2, gb2, gwatt, gbatt, gwc1, gbc1, gwc2, gwn1, gbn1, gwn2, gbn2};
}

}  // namespace

TORCH_LIBRARY_IMPL(tbg, CUDA, m) {
  m.impl("egnn_forward", &egnn_forward_cuda);
  m.impl("egnn_backward", &egnn_backward_cuda);
}

}  // namespace tbg
