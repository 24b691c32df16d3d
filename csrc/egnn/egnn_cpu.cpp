// CPU kernels of tbg::egnn_forward and tbg::egnn_backward (schemas in ../ops.cpp).
//
// Design: the WHOLE STACK PER MOLECULE. All L layers of a molecule (forward, and in backward the
// recomputation plus the gradients) run back to back while everything the molecule touches stays
// in L2: h, x, the node products and one receiver's edge tile are a few hundred KiB at most for
// the published sizes (N <= 51, H <= 128). No padding work in the ragged layout.
//
// Threads (make_plan): with many molecules, whole molecules are spread over threads with one
// at::parallel_for per call: no synchronisation inside a molecule and no races (every
// sender/receiver update of a molecule happens on one thread). That leaves threads idle at
// batch 1, with fewer molecules than threads, or with one big molecule among small ones (its
// n^2 edges dominate), so a molecule holding more than a 1/T share of the work runs alone, split
// over the T threads by blocks of receiver atoms. It is the same code: the per-molecule
// functions always loop over atom blocks with for_parts, which is one inline block when the
// molecule runs whole on its thread (a nested at::parallel_for runs inline). Splitting by
// receivers keeps the edge work (~all of it) balanced and every forward write in the block's
// own rows (agg_i, x_i, h_i): the forward needs two parallel passes per layer (node products,
// then edges + node update) and its result does not depend on the split. The backward also
// scatters to senders (gQ_j, gx_j, gx0_j) and sums weight gradients over all edges; each block
// gets its own partial sums and weight-gradient accumulator, added in block order, so a fixed
// thread count gives the same bits every run and other thread counts differ only by the
// summation order. Partials cost T x (n H + 6 n) per molecule plus the accumulators the
// molecule-parallel path has anyway; a barrier costs microseconds against the edge work of a
// layer (forward ~0.3 ms at N = 22, H = 64; ~4 ms at N = 51, H = 128; backward ~3x that).
// Not done: splitting the senders (the tile GEMMs per receiver are already small) or mixing
// alone and shared molecules in one parallel region (the alone ones run one after another).
//
// Algebra: W1 [h_i, h_j, r, a] + b1 = P_i + Q_j + w_r r + w_a a with P = h W1a^T + b1 and
// Q = h W1b^T computed once per atom (node-level GEMMs), so the first edge linear costs ~H per
// edge instead of (2H + 2) H. What remains per edge are the two H x H products (W2, Wc1), done as
// GEMMs over one receiver's n - 1 edges at a time (a [n - 1, Hp] tile in L1/L2) with a register-
// blocked 6 x 16 microkernel; SiLU, the attention gate, the coordinate head and the sums over
// senders are fused around them. The last layer's node update is skipped (its h only feeds the
// unused h_out). Backward recomputes each layer's edge tile once per receiver from the saved
// layer inputs h_states/x_states and back-propagates right away (4 more tile GEMMs: the input
// gradients through W2/Wc1 and their weight gradients), so memory is O(M H) plus per-thread
// scratch; weight gradients go to per-thread accumulators that are summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/constants.h"
#include "common/egnn_args.h"

namespace tbg {
namespace egnn_cpu {

#define TBG_EGNN_ISA base
#include "egnn/egnn_cpu_kernels.h"
#undef TBG_EGNN_ISA

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TBG_EGNN_ISA avx2
#include "egnn/egnn_cpu_kernels.h"
#undef TBG_EGNN_ISA
#pragma GCC pop_options
#define TBG_EGNN_HAVE_AVX2 1

bool use_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

constexpr int64_t kPad = 16;  // hidden width padded to the microkernel's 16-float panel

// The weights re-laid out for the kernels (see LayerW) in one buffer: 7 transposed matrices
// [L, Hp, Hp] (all the forward needs), the same 7 as is (backward only), then 9 vectors [L, Hp],
// zero-padded. Packing is serial work in every call (~0.2 ms at H = 64, L = 5 as ~50 small ATen
// ops, against ~1 ms of batch-1 edge work), so it is one allocation filled by a parallel loop
// over (matrix, layer).
template <typename T>
struct PackedWeights {
  at::Tensor keep;
  Net<T> net;

  // A [L, out, in] source (any strides), packed as is or transposed to [in, out].
  struct Src {
    const T* p;
    int64_t s0, s1, s2, rows, cols;
    bool transpose;
  };
  static Src src(const at::Tensor& m, bool transpose) {
    return {m.data_ptr<T>(), m.stride(0), m.stride(1), m.stride(2), m.size(1), m.size(2), transpose};
  }

  PackedWeights(const EGNNWeights& w, double range, bool backward) {
    const int64_t L = w.n_layers, H = w.hidden, Hp = (H + kPad - 1) / kPad * kPad;
    net.L = L, net.H = H, net.Hp = Hp, net.range = static_cast<T>(range);
    const at::Tensor w1a = w.w1.narrow(2, 0, H), w1b = w.w1.narrow(2, H, H);
    const at::Tensor wn1a = w.wn1.narrow(2, 0, H), wn1b = w.wn1.narrow(2, H, H);
    const Src mats[] = {src(w1a, true),   src(w1b, true),   src(w.w2, true),  src(w.wc1, true), src(wn1a, true),
                        src(wn1b, true),  src(w.wn2, true), src(w1a, false),  src(w1b, false),  src(w.w2, false),
                        src(w.wc1, false), src(wn1a, false), src(wn1b, false), src(w.wn2, false)};
    const at::Tensor vecs[] = {w.w1.select(2, 2 * H), w.w1.select(2, 2 * H + 1), w.b1, w.b2, w.watt, w.bc1, w.wc2,
                               w.bn1, w.bn2};
    const int64_t nm = backward ? std::size(mats) : std::size(mats) / 2, nv = std::size(vecs);
    keep = at::empty({(nm * Hp + nv) * L * Hp}, w.w1.options());
    T* const mat0 = keep.data_ptr<T>();
    T* const vec0 = mat0 + nm * L * Hp * Hp;
    at::parallel_for(0, nm * L, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const Src& m = mats[j / L];
        const T* a = m.p + (j % L) * m.s0;
        T* out = mat0 + j * Hp * Hp;
        if (m.rows < Hp || m.cols < Hp) std::fill(out, out + Hp * Hp, T(0));
        // Read the source in its row order (a transposed block is written column-wise).
        const int64_t rs = m.transpose ? 1 : Hp, cs = m.transpose ? Hp : 1;
        for (int64_t o = 0; o < m.rows; ++o)
          for (int64_t i = 0; i < m.cols; ++i) out[o * rs + i * cs] = a[o * m.s1 + i * m.s2];
      }
    });
    for (int64_t k = 0; k < nv; ++k) {  // [L, H] sources, any strides
      const T* a = vecs[k].data_ptr<T>();
      const int64_t s0 = vecs[k].stride(0), s1 = vecs[k].stride(1);
      for (int64_t l = 0; l < L; ++l)
        for (int64_t c = 0; c < Hp; ++c) vec0[(k * L + l) * Hp + c] = c < H ? a[l * s0 + c * s1] : T(0);
    }
    const T* batt = w.batt.data_ptr<T>();
    auto M = [&](int k, int64_t l) { return k < nm ? mat0 + (k * L + l) * Hp * Hp : nullptr; };
    auto V = [&](int k, int64_t l) { return vec0 + (k * L + l) * Hp; };
    net.w.resize(L);
    for (int64_t l = 0; l < L; ++l)
      net.w[l] = {M(0, l),  M(1, l),  M(7, l),  M(8, l),  V(0, l),  V(1, l),  V(2, l),  M(2, l),
                  M(9, l),  V(3, l),  V(4, l),  batt[l * w.batt.stride(0)],
                  M(3, l),  M(10, l), V(5, l),  V(6, l),
                  M(4, l),  M(5, l),  M(11, l), M(12, l), V(7, l),  M(6, l),  M(13, l), V(8, l)};
  }
};

// How one call spreads its molecules over the T threads. Going from the largest molecule down,
// a molecule that holds more than a 1/T share of the work not yet assigned (n^2: the edges
// dominate) runs alone, its receivers split into T blocks; the rest run whole, spread over the
// threads. So batch 1, batches of fewer molecules than threads and one big molecule among small
// ones use every thread, while large batches keep the molecule-parallel path (no per-layer
// synchronisation, no partial sums). The plan depends on the sizes and T only.
struct Plan {
  std::vector<int64_t> shared, alone;
  int64_t nmax_shared = 0, nmax_alone = 0, parts = 1;
};

Plan make_plan(const int64_t* ptr, int64_t B) {
  Plan plan;
  plan.parts = at::get_num_threads();
  auto size = [&](int64_t b) { return ptr[b + 1] - ptr[b]; };
  std::vector<int64_t> order;
  int64_t remaining = 0;
  for (int64_t b = 0; b < B; ++b)
    if (size(b) > 0) order.push_back(b), remaining += size(b) * size(b);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return size(a) > size(b); });
  std::vector<bool> alone(B, false);
  for (const int64_t b : order) {
    const int64_t work = size(b) * size(b);
    if (plan.parts == 1 || work * plan.parts <= remaining) break;
    alone[b] = true, remaining -= work;
    plan.alone.push_back(b), plan.nmax_alone = std::max(plan.nmax_alone, size(b));
  }
  for (int64_t b = 0; b < B; ++b)
    if (size(b) > 0 && !alone[b]) plan.shared.push_back(b), plan.nmax_shared = std::max(plan.nmax_shared, size(b));
  plan.parts = std::clamp<int64_t>(plan.nmax_alone, 1, plan.parts);  // no more blocks than receivers
  return plan;
}

template <typename T>
at::Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  // Every element is overwritten by the kernel; NaN makes a missed one impossible to overlook.
  return at::full(sizes, std::numeric_limits<T>::quiet_NaN(), opts);
}

template <typename T, typename Ns>
void forward_impl(const PackedWeights<T>& pw, const int64_t* ptr, int64_t B, const T* x, const T* h0,
                  T* v, T* hs, T* xs, int64_t M) {
  const Net<T>& net = pw.net;
  const int64_t H = net.H;
  const Plan plan = make_plan(ptr, B);
  auto run = [&](int64_t b, Workspace<T>& ws) {
    const int64_t s = ptr[b];
    Ns::forward_molecule(net, ptr[b + 1] - s, x + 3 * s, h0 + H * s, v + 3 * s, hs + H * s, M * H, xs + 3 * s,
                         M * 3, ws);
  };
  const int64_t n_shared = static_cast<int64_t>(plan.shared.size());
  at::parallel_for(0, n_shared, 1, [&](int64_t k0, int64_t k1) {
    Workspace<T> ws(plan.nmax_shared, net.Hp, 1, false);
    for (int64_t k = k0; k < k1; ++k) run(plan.shared[k], ws);
  });
  if (plan.alone.empty()) return;
  Workspace<T> ws(plan.nmax_alone, net.Hp, plan.parts, false);
  for (const int64_t b : plan.alone) run(b, ws);
}

// Weight gradients go to per-thread accumulators (molecules spread over threads) or to one
// accumulator per receiver block (molecules alone), summed in a fixed order by the caller. Each
// is zeroed on first use by the thread that fills it.
template <typename T, typename Ns>
void backward_impl(const PackedWeights<T>& pw, const int64_t* ptr, int64_t B, const T* x, const T* gv,
                   const T* hs, const T* xs, int64_t M, T* gx, T* gh0,
                   std::vector<std::vector<T>>& thread_grads) {
  const Net<T>& net = pw.net;
  const int64_t H = net.H;
  const Plan plan = make_plan(ptr, B);
  std::vector<GradAcc<T>> acc(std::max<int64_t>(at::get_num_threads(), plan.parts));
  auto run = [&](int64_t b, Workspace<T>& ws, GradAcc<T>* const* G) {
    const int64_t s = ptr[b];
    Ns::backward_molecule(net, G, ptr[b + 1] - s, x + 3 * s, gv + 3 * s, hs + H * s, M * H, xs + 3 * s, M * 3,
                          gx + 3 * s, gh0 + H * s, ws);
  };
  const int64_t n_shared = static_cast<int64_t>(plan.shared.size());
  at::parallel_for(0, n_shared, 1, [&](int64_t k0, int64_t k1) {
    GradAcc<T>* G = &acc[at::get_thread_num()];
    Workspace<T> ws(plan.nmax_shared, net.Hp, 1, true);
    for (int64_t k = k0; k < k1; ++k) run(plan.shared[k], ws, &G);
  });
  if (!plan.alone.empty()) {
    std::vector<GradAcc<T>*> G(plan.parts);
    for (int64_t p = 0; p < plan.parts; ++p) G[p] = &acc[p];
    Workspace<T> ws(plan.nmax_alone, net.Hp, plan.parts, true);
    for (const int64_t b : plan.alone) run(b, ws, G.data());
  }
  for (auto& G : acc)
    if (!G.buf.empty()) thread_grads.push_back(std::move(G.buf));
}

// Adapters naming each ISA build's two entry points, so the drivers above are written once.
#define TBG_EGNN_NS_ADAPTER(NS)                                                                  \
  struct NS##_ns {                                                                               \
    template <typename... A>                                                                     \
    static void forward_molecule(A&&... a) { NS::forward_molecule(std::forward<A>(a)...); }      \
    template <typename... A>                                                                     \
    static void backward_molecule(A&&... a) { NS::backward_molecule(std::forward<A>(a)...); }    \
  };
TBG_EGNN_NS_ADAPTER(base)
#ifdef TBG_EGNN_HAVE_AVX2
TBG_EGNN_NS_ADAPTER(avx2)
#endif

EGNNWeights weights(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    const at::Tensor& watt, const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1,
                    const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2,
                    const at::Tensor& bn2) {
  return {w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> egnn_forward(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& mol_ptr, const at::Tensor& w1,
    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& watt,
    const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1, const at::Tensor& wc2,
    const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2, const at::Tensor& bn2,
    double coords_range) {
  const EGNNWeights w = check_egnn_args("tbg::egnn_forward", x, h0, mol_ptr,
                                        weights(w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2));
  const int64_t M = x.size(0), H = w.hidden, L = w.n_layers, B = mol_ptr.size(0) - 1;
  at::Tensor v, hs, xs;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "egnn_forward_cpu", [&] {
    v = poisoned<scalar_t>({M, 3}, x.options());
    hs = poisoned<scalar_t>({L, M, H}, x.options());
    xs = poisoned<scalar_t>({L, M, 3}, x.options());
    const PackedWeights<scalar_t> pw(w, coords_range, false);
    const auto args = std::make_tuple(std::cref(pw), mol_ptr.data_ptr<int64_t>(), B, x.data_ptr<scalar_t>(),
                                      h0.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(),
                                      xs.data_ptr<scalar_t>(), M);
#ifdef TBG_EGNN_HAVE_AVX2
    if (use_avx2()) return std::apply(forward_impl<scalar_t, avx2_ns>, args);
#endif
    std::apply(forward_impl<scalar_t, base_ns>, args);
  });
  return {v, hs, xs};
}

std::vector<at::Tensor> egnn_backward(
    const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& mol_ptr,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const at::Tensor& watt, const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1,
    const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1, const at::Tensor& wn2,
    const at::Tensor& bn2, const at::Tensor& h_states, const at::Tensor& x_states, double coords_range) {
  const char* op = "tbg::egnn_backward";
  const EGNNWeights w = check_egnn_args(op, x, h0, mol_ptr,
                                        weights(w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2));
  const int64_t M = x.size(0), H = w.hidden, L = w.n_layers, B = mol_ptr.size(0) - 1;
  auto check_like = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), op, ": ", name,
                " must match x in dtype and device");
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  };
  check_like(grad_v, "grad_v", {M, 3});
  check_like(h_states, "h_states", {L, M, H});
  check_like(x_states, "x_states", {L, M, 3});
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "egnn_backward_cpu", [&] {
    using T = scalar_t;
    at::Tensor gx = poisoned<T>({M, 3}, x.options()), gh0 = poisoned<T>({M, H}, x.options());
    const PackedWeights<T> pw(w, coords_range, true);
    std::vector<std::vector<T>> thread_grads;
    const auto args = std::make_tuple(std::cref(pw), mol_ptr.data_ptr<int64_t>(), B, x.data_ptr<T>(),
                                      grad_v.data_ptr<T>(), h_states.data_ptr<T>(), x_states.data_ptr<T>(), M,
                                      gx.data_ptr<T>(), gh0.data_ptr<T>(), std::ref(thread_grads));
    bool done = false;
#ifdef TBG_EGNN_HAVE_AVX2
    if (use_avx2()) std::apply(backward_impl<T, avx2_ns>, args), done = true;
#endif
    if (!done) std::apply(backward_impl<T, base_ns>, args);
    // Sum the per-thread accumulators, then cut the padded [L, ...] blocks to the weights' shapes
    // (same carving order as GradAcc::init).
    const int64_t Hp = pw.net.Hp, stride = GradAcc<T>::layer_size(Hp);
    at::Tensor sum = at::zeros({L, stride}, x.options());
    for (auto& g : thread_grads) sum.add_(at::from_blob(g.data(), {L, stride}, x.options()));
    int64_t off = 0;
    auto mat = [&]() { auto t = sum.narrow(1, off, Hp * Hp).view({L, Hp, Hp}).narrow(1, 0, H).narrow(2, 0, H); off += Hp * Hp; return t; };
    auto vec = [&]() { auto t = sum.narrow(1, off, Hp).narrow(1, 0, H); off += Hp; return t; };
    const at::Tensor gw1a = mat(), gw1b = mat(), gw2 = mat(), gwc1 = mat(), gwn1a = mat(), gwn1b = mat(), gwn2 = mat();
    const at::Tensor gwr = vec(), gwa = vec(), gb1 = vec(), gb2 = vec(), gwatt = vec(), gbc1 = vec(), gwc2 = vec(),
                     gbn1 = vec(), gbn2 = vec(), gbatt = vec().select(1, 0);
    const at::Tensor gw1 = at::cat({gw1a, gw1b, gwr.unsqueeze(2), gwa.unsqueeze(2)}, 2);
    const at::Tensor gwn1 = at::cat({gwn1a, gwn1b}, 2);
    out = {gx, gh0, gw1, gb1.contiguous(), gw2.contiguous(), gb2.contiguous(), gwatt.contiguous(), gbatt.contiguous(),
           gwc1.contiguous(), gbc1.contiguous(), gwc2.contiguous(), gwn1, gbn1.contiguous(), gwn2.contiguous(),
           gbn2.contiguous()};
  });
  return out;
}

}  // namespace egnn_cpu

TORCH_LIBRARY_IMPL(tbg, CPU, m) {
  m.impl("egnn_forward", &egnn_cpu::egnn_forward);
  m.impl("egnn_backward", [](const at::Tensor& grad_v, const at::Tensor& x, const at::Tensor& h0,
                             const at::Tensor& mol_ptr, const at::Tensor& w1, const at::Tensor& b1,
                             const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& watt,
                             const at::Tensor& batt, const at::Tensor& wc1, const at::Tensor& bc1,
                             const at::Tensor& wc2, const at::Tensor& wn1, const at::Tensor& bn1,
                             const at::Tensor& wn2, const at::Tensor& bn2, const at::Tensor& h_states,
                             const at::Tensor& x_states, double coords_range) {
    const auto g = egnn_cpu::egnn_backward(grad_v, x, h0, mol_ptr, w1, b1, w2, b2, watt, batt, wc1, bc1, wc2,
                                           wn1, bn1, wn2, bn2, h_states, x_states, coords_range);
    return std::make_tuple(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12],
                           g[13], g[14]);
  });
}

}  // namespace tbg
