// Schemas of every tbg operator, in one place. Kernels register per dispatch key in
// egnn/ and divergence/ (CPU beside, CUDA in .cu files); fake (meta) kernels, autograd and the
// Python implementations of ops without a compiled CUDA kernel are registered by tbg/nn/ops.py,
// which `import tbg` imports, so torch.compile can trace through every op.
//
// All ops take the ragged layout: the atoms of all molecules concatenated (x [M, 3],
// h0 [M, H] = embedding of [features, t]), with mol_ptr [B + 1] (int64, on x's device) giving each
// molecule's atom range; every ordered pair of distinct atoms inside a molecule is an edge.
// Fixed and padded batches are converted to this layout in Python, so no kernel ever works
// on padding. Per-layer weights are stacked over the L layers (PyTorch Linear layout, [out, in]),
// in this order (tbg/nn/spec.py is the Python definition; common/egnn_args.h checks it):
//   w1 [L, H, 2H+2]  b1 [L, H]     edge MLP, first linear; input order (h_i, h_j, r_ij, a_ij)
//   w2 [L, H, H]     b2 [L, H]     edge MLP, second linear
//   watt [L, H]      batt [L]      attention gate sigmoid(watt . m + batt)
//   wc1 [L, H, H]    bc1 [L, H]    coordinate MLP, first linear
//   wc2 [L, H]                     coordinate MLP, last linear (no bias), then tanh * coords_range
//   wn1 [L, H, 2H]   bn1 [L, H]    node MLP, first linear; input order (h_i, sum_j m_ij)
//   wn2 [L, H, H]    bn2 [L, H]    node MLP, second linear (residual update)
// The semantics are those of tbg.nn.reference, written out in docs/model.md; docs/architecture.md
// lists which file serves each op on each device.
#include <torch/library.h>

#define TBG_EGNN_WEIGHTS                                                                   \
  "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor watt, Tensor batt, Tensor wc1, "   \
  "Tensor bc1, Tensor wc2, Tensor wn1, Tensor bn1, Tensor wn2, Tensor bn2"

TORCH_LIBRARY(tbg, m) {
  // Vector field v [M, 3] (mean over each molecule's atoms removed), plus the inputs of every
  // layer, h_states [L, M, H] and x_states [L, M, 3], which the backward pass recomputes from.
  m.def("egnn_forward(Tensor x, Tensor h0, Tensor mol_ptr, " TBG_EGNN_WEIGHTS
        ", float coords_range) -> (Tensor v, Tensor h_states, Tensor x_states)");
  // Gradients of <grad_v, v> for x, h0 and the 13 weights (same order as the inputs). Edge
  // activations are recomputed per layer, so memory stays O(M * H).
  m.def("egnn_backward(Tensor grad_v, Tensor x, Tensor h0, Tensor mol_ptr, " TBG_EGNN_WEIGHTS
        ", Tensor h_states, Tensor x_states, float coords_range) -> (Tensor grad_x, "
        "Tensor grad_h0, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, "
        "Tensor grad_watt, Tensor grad_batt, Tensor grad_wc1, Tensor grad_bc1, Tensor grad_wc2, "
        "Tensor grad_wn1, Tensor grad_bn1, Tensor grad_wn2, Tensor grad_bn2)");
  // Vector field v [M, 3] and its exact divergence div [B] = tr(dv/dx) per molecule, by
  // forward-mode propagation of the 3 n_i unit tangents of each molecule, tangent_chunk at a time.
  m.def("egnn_divergence(Tensor x, Tensor h0, Tensor mol_ptr, " TBG_EGNN_WEIGHTS
        ", float coords_range, int tangent_chunk) -> (Tensor v, Tensor div)");
  // Vector field v [M, 3] and Jacobian-vector products jvp [K, M, 3] = (dv/dx) tangents[k] for
  // K tangents [K, M, 3] (Hutchinson probes, or any directions).
  m.def("egnn_jvp(Tensor x, Tensor h0, Tensor mol_ptr, " TBG_EGNN_WEIGHTS
        ", Tensor tangents, float coords_range) -> (Tensor v, Tensor jvp)");
}
