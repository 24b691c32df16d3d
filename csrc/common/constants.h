// Numbers the kernels share with the Python layer. tbg/nn/spec.py holds the Python copies, and
// tests/test_nn_structure.py compares them with the values the library was compiled with, which
// constants.cpp exports as plain C symbols.
#pragma once

#include <cstdint>

namespace tbg {

// Edge direction n_ij = d_ij / (sqrt(r_ij + kEdgeEps) + 1): differentiable at r = 0.
constexpr double kEdgeEps = 1e-8;
// Tangents x edges x H of one (molecule, chunk) work item of the CPU divergence / JVP kernels.
constexpr int64_t kCpuTangentBudget = int64_t{1} << 23;

}  // namespace tbg
