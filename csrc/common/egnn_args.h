// Argument checking and weight views shared by the CPU and CUDA kernels of every op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>

namespace tbg {

// The 13 stacked per-layer weight tensors of the EGNN, in schema order (layout: ops.cpp; the
// Python definition is tbg/nn/spec.py, and tests/test_nn_structure.py checks that the error
// messages below name them in that order).
struct EGNNWeights {
  at::Tensor w1, b1, w2, b2, watt, batt, wc1, bc1, wc2, wn1, bn1, wn2, bn2;
  int64_t n_layers = 0;
  int64_t hidden = 0;

  std::array<const at::Tensor*, 13> all() const {
    return {&w1, &b1, &w2, &b2, &watt, &batt, &wc1, &bc1, &wc2, &wn1, &bn1, &wn2, &bn2};
  }
};

inline const char* kWeightNames[13] = {"w1",  "b1",  "w2",  "b2",  "watt", "batt", "wc1",
                                       "bc1", "wc2", "wn1", "bn1", "wn2",  "bn2"};

// Checks shapes, dtypes, devices and contiguity of x [M, 3], h0 [M, H], mol_ptr [B + 1] and the
// weights; on CPU also that mol_ptr starts at 0, never decreases and ends at M. Returns the
// weights with L and H filled in. `op` names the operator in error messages.
inline EGNNWeights check_egnn_args(const char* op, const at::Tensor& x, const at::Tensor& h0,
                                   const at::Tensor& mol_ptr, EGNNWeights w) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 3, op, ": x must have shape [M, 3], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == x.size(0), op, ": h0 must have shape [M, H] with M = ",
              x.size(0), " atoms, got ", h0.sizes());
  TORCH_CHECK(mol_ptr.dim() == 1 && mol_ptr.size(0) >= 1 && mol_ptr.scalar_type() == at::kLong, op,
              ": mol_ptr must be a 1-d int64 tensor of length n_molecules + 1, got ",
              mol_ptr.sizes(), " ", mol_ptr.scalar_type());
  TORCH_CHECK(mol_ptr.device() == x.device(), op, ": mol_ptr is on ", mol_ptr.device(),
              " but x is on ", x.device());
  w.n_layers = w.w1.dim() == 3 ? w.w1.size(0) : -1;
  w.hidden = h0.size(1);
  const int64_t L = w.n_layers, H = w.hidden;
  TORCH_CHECK(L >= 1, op, ": w1 must have shape [L, H, 2H + 2], got ", w.w1.sizes());
  const std::array<std::vector<int64_t>, 13> shapes = {{{L, H, 2 * H + 2}, {L, H}, {L, H, H}, {L, H},
                                                       {L, H}, {L}, {L, H, H}, {L, H}, {L, H},
                                                       {L, H, 2 * H}, {L, H}, {L, H, H}, {L, H}}};
  const auto tensors = w.all();
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = *tensors[k];
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[k]), op, ": weight ", kWeightNames[k],
                " must have shape ", at::IntArrayRef(shapes[k]), " for L = ", L, ", H = ", H,
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": weight ", kWeightNames[k], " is ",
                t.scalar_type(), " but x is ", x.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": weight ", kWeightNames[k], " is on ", t.device(),
                " but x is on ", x.device());
    TORCH_CHECK(t.is_contiguous(), op, ": weight ", kWeightNames[k], " must be contiguous");
  }
  TORCH_CHECK(h0.scalar_type() == x.scalar_type() && h0.device() == x.device(), op,
              ": h0 must match x in dtype and device");
  TORCH_CHECK(x.is_contiguous() && h0.is_contiguous() && mol_ptr.is_contiguous(), op,
              ": x, h0 and mol_ptr must be contiguous");
  if (mol_ptr.device().is_cpu()) {
    const int64_t* p = mol_ptr.data_ptr<int64_t>();
    const int64_t n = mol_ptr.size(0);
    TORCH_CHECK(p[0] == 0, op, ": mol_ptr must start at 0, got ", p[0]);
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK(p[i] >= p[i - 1], op, ": mol_ptr must not decrease, but mol_ptr[", i, "] = ", p[i],
                  " < mol_ptr[", i - 1, "] = ", p[i - 1]);
    }
    TORCH_CHECK(p[n - 1] == x.size(0), op, ": mol_ptr must end at M = ", x.size(0), ", got ",
                p[n - 1]);
  }
  return w;
}

}  // namespace tbg
