// The shared constants as C symbols of the library, so that a test can read (with ctypes) what the
// kernels were compiled with, without an operator for it.
#include "common/constants.h"

extern "C" const double tbg_edge_eps = tbg::kEdgeEps;
extern "C" const int64_t tbg_cpu_tangent_budget = tbg::kCpuTangentBudget;
