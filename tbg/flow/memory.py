"""Working memory of sampling against the batch size: the cost model behind ``SampleConfig``'s
``memory_budget_gb`` and ``batch_size="auto"``.

What is modelled: the peak of the memory a chunk of B samples needs above what the process holds before
it (model weights, libraries, the CUDA context): on a GPU the CUDA allocator's tensors, on the CPU the
resident set (``tbg.flow.profile.PeakMemory`` measures exactly this). Per chunk

    peak(B) = fixed + solver(B) + max(field(B), divergence(B))

because the solver keeps its state for the whole solve while the right-hand-side evaluations run one at
a time and free their activations when they return. Every constant below is an upper envelope of
measurements on the CPU (peak resident set in float32, torch 2.14, torchdiffeq; bench/RESULTS.md,
"Profiling large-batch sampling (CPU)" sets model and measurement side by side), i.e. it includes the
allocator's fragmentation; on a GPU the allocator counts only live tensors, so the same constants are
conservative there. Symbols: N atoms, F features, H hidden, L
layers, E = N (N - 1) edges per molecule, s bytes per element.

* fixed: ``FIXED_BYTES`` for what does not scale with anything above: up to 2 MiB measured in a warm
  process, and up to 3 MiB more in the first chunk of a fresh one (first use of thread pools, arenas).
* solver: ``SOLVER_COPIES[method]`` copies of the state [B, 3N] (Runge-Kutta stages, their weighted sums,
  error norms, dense-output coefficients), plus K + 4 for the decoupled likelihood's path at K nodes.
* field, fused ops (``tbg::egnn_forward``, CPU and CUDA): O(B N H): the per-layer inputs it returns
  ([L, M, H] and [L, M, 3], M = B N), the embedding and its inputs, per atom
  (L + 1) H + 2 F + 3 L + 11 elements (CUDA: + 4 H for the per-atom GEMM outputs). Edge activations
  never reach memory.
* field, reference: about ``REFERENCE_EDGE_TENSORS`` [B E, H] edge tensors alive at once.
* divergence, CPU kernel (``tbg::egnn_divergence``): work items (molecule, chunk of T tangents) run one
  per thread, each holding the molecule's edge cache and its tangents, about
  40 E H + 12 T N H + T E + 2^16 elements (measured 1.0-1.8 x less); T is at most
  min(3N, 2^23 / (E H)), tbg.nn's default tangent chunk on the CPU (``spec.CPU_TANGENT_BUDGET``; a chunk
  is smaller when that keeps more threads busy, which the model ignores: it charges every thread a full
  item). So this part does not grow with B: the threads, not the batch, set it. On top, per sample, the
  embedding (H + 2F + 11 per atom).
* divergence, CUDA (tbg.nn's batched torch-ops implementation): molecules are processed in groups whose
  T E H stays under 2^26 elements with T = min(3N, 2^26 / (E H)); about ``BATCHED_ALIVE`` [T, E_group, H]
  tensors are alive at once (the implementation's own estimate; 4-7 measured on the CPU). So it grows
  with B until one group is full (ala2, H = 64: 34 molecules, about 2 GiB) and stays there.
* divergence, reference (vmap of jvp): all T tangents at once (T = 3N, or the ``tangent_chunk`` /
  Hutchinson ``n_probes`` given in the dynamics' ``divergence_options``), about
  ``REFERENCE_TANGENT_EDGE_TENSORS`` [T, B E, H] tensors.

Not modelled: fused ops on other devices, a hand-written CUDA divergence kernel (the model then takes the
batched implementation's figure), gradients (sampling runs without autograd). ``tbg profile`` prints the
model next to the measured peak of every batch size, so a new device or kernel shows how far off it is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

from tbg import has_kernel
from tbg.nn import EGNN, spec

log = logging.getLogger("tbg")

__all__ = ["SOLVER_COPIES", "MemoryModel", "default_memory_budget"]

# Copies of the state [B, 3N] the solver holds at its peak (CPU measurement, max over joint / v-only,
# D = 66 and 150, B = 4096 and 16384, rounded up).
SOLVER_COPIES: dict[str, int] = {"dopri5": 72, "dopri8": 144, "bosh3": 52, "adaptive_heun": 48, "fehlberg2": 48,
                                 "rk4": 32, "midpoint": 24, "euler": 20}
FIXED_BYTES = 8 << 20
REFERENCE_EDGE_TENSORS = 14  # measured 9-13 [B E, H] tensors (L = 2-5)
REFERENCE_TANGENT_EDGE_TENSORS = 16  # measured 8-14 [T, B E, H] tensors
CPU_ITEM_EDGE = 40  # x E H per CPU divergence work item (edge cache and primal temporaries)
CPU_ITEM_TANGENT = 12  # x T N H per CPU divergence work item (tangents of h and their products)
CPU_CHUNK_BUDGET = spec.CPU_TANGENT_BUDGET  # T E H bound of the CPU kernel's tangent chunk
BATCHED_BUDGET = spec.TORCH_TANGENT_BUDGET  # T E_group H bound of a group in the batched implementation
BATCHED_ALIVE = 8


@dataclass(frozen=True)
class MemoryModel:
    """Peak working memory of sampling one molecule of ``n_atoms`` with an EGNN (see module docstring).

    ``fused_field`` / ``fused_divergence``: the fused ops run the field / the divergence (else the
    reference; a build may have one op and not the other). ``divergence_tangents``:
    tangents per divergence evaluation when not the exact trace's 3N (Hutchinson probes) or when a
    tangent chunk is forced (None: the defaults).
    """

    n_atoms: int
    n_features: int
    hidden: int
    n_layers: int
    likelihood: Literal["joint", "decoupled", "none"]
    fused_field: bool
    fused_divergence: bool
    device_type: str = "cpu"
    element_bytes: int = 4
    method: str = "dopri5"
    n_quadrature: int = 16
    threads: int = 1
    divergence_tangents: int | None = None

    @classmethod
    def for_dynamics(cls, dyn: object, n_atoms: int, *, likelihood: str, method: str, n_quadrature: int,
                     dtype: torch.dtype, device: torch.device) -> MemoryModel | None:
        """The model of ``dyn`` if it is an EGNN-backed dynamics (``tbg.nn.BoundDynamics``), else None."""
        egnn = getattr(dyn, "egnn", None)
        if not isinstance(egnn, EGNN):
            return None
        fused = egnn.resolve_backend(getattr(dyn, "backend", "auto"), device) == "fused"
        options = getattr(dyn, "divergence_options", {}) or {}
        hutchinson = options.get("method") == "hutchinson"
        tangents = options.get("n_probes", 1) if hutchinson else options.get("tangent_chunk")
        fused_divergence = fused and has_kernel("egnn_jvp" if hutchinson else "egnn_divergence", device)
        return cls(n_atoms=n_atoms, n_features=egnn.n_features, hidden=egnn.hidden, n_layers=egnn.n_layers,
                   likelihood=likelihood, fused_field=fused, fused_divergence=fused_divergence,
                   device_type=device.type,
                   element_bytes=torch.finfo(dtype).bits // 8, method=method, n_quadrature=n_quadrature,
                   threads=torch.get_num_threads(), divergence_tangents=tangents)

    # ---- the terms, in bytes ---------------------------------------------------------------------
    @property
    def _edges(self) -> int:
        return self.n_atoms * (self.n_atoms - 1)

    def solver_bytes(self, batch: int) -> int:
        copies = SOLVER_COPIES.get(self.method, max(SOLVER_COPIES.values()))
        if self.likelihood == "decoupled":
            copies += self.n_quadrature + 4
        return copies * batch * 3 * self.n_atoms * self.element_bytes

    def _embedding_per_atom(self) -> int:
        return self.hidden + 2 * self.n_features + 11

    def field_bytes(self, batch: int) -> int:
        n, h, layers = self.n_atoms, self.hidden, self.n_layers
        if self.fused_field:
            per_atom = (layers + 1) * h + 2 * self.n_features + 3 * layers + 11
            per_atom += 4 * h if self.device_type == "cuda" else 0
            return batch * n * per_atom * self.element_bytes
        return batch * (REFERENCE_EDGE_TENSORS * self._edges * h + n * self._embedding_per_atom()) * self.element_bytes

    def divergence_bytes(self, batch: int) -> int:
        n, h, e = self.n_atoms, self.hidden, self._edges
        per_sample = n * self._embedding_per_atom()
        if not self.fused_divergence:
            tangents = self.divergence_tangents or 3 * n
            per_sample += (REFERENCE_TANGENT_EDGE_TENSORS * tangents + REFERENCE_EDGE_TENSORS) * e * h
            return batch * per_sample * self.element_bytes
        if self.device_type == "cuda":
            tangents = min(self.divergence_tangents or 3 * n, max(1, BATCHED_BUDGET // (e * h)))
            group = min(batch, max(1, BATCHED_BUDGET // (tangents * e * h)))
            fixed = BATCHED_ALIVE * group * tangents * e * h
        else:
            tangents = min(self.divergence_tangents or 3 * n, max(1, CPU_CHUNK_BUDGET // (e * h)))
            item = CPU_ITEM_EDGE * e * h + CPU_ITEM_TANGENT * tangents * n * h + tangents * e + (1 << 16)
            # Up to one item per thread: the kernel splits even one molecule's tangents over idle threads.
            fixed = min(self.threads, batch * 3 * n) * item
        return (fixed + batch * per_sample) * self.element_bytes

    def terms(self, batch: int) -> dict[str, int]:
        """The modelled bytes of each part for ``batch`` samples (0 for parts the run does not use)."""
        return {"solver": self.solver_bytes(batch),
                "field": self.field_bytes(batch) if self.likelihood != "joint" else 0,
                "divergence": self.divergence_bytes(batch) if self.likelihood != "none" else 0}

    def peak_bytes(self, batch: int) -> int:
        """Modelled peak working memory of one chunk of ``batch`` samples."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        t = self.terms(batch)
        return FIXED_BYTES + t["solver"] + max(t["field"], t["divergence"])

    def largest_batch(self, budget_bytes: float, limit: int = 1 << 24) -> int:
        """The largest batch (at most ``limit``) whose modelled peak fits ``budget_bytes``; 1, with a warning,
        when not even one sample fits (peak_bytes grows with the batch, so a bisection finds it)."""
        if self.peak_bytes(1) > budget_bytes:
            log.warning("the memory budget (%.3g GiB) is below the modelled need of one sample (%.3g GiB); "
                        "sampling one at a time", budget_bytes / 2**30, self.peak_bytes(1) / 2**30)
            return 1
        lo, hi = 1, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.peak_bytes(mid) <= budget_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo


def default_memory_budget(device: torch.device) -> float:
    """Bytes for sampling when no budget is given: 80% of the GPU's memory, or half the machine's RAM
    (shared machines). Both depend only on the hardware, so a rerun resolves the same batch size and
    resumes the same chunks."""
    if device.type == "cuda":
        return 0.8 * torch.cuda.get_device_properties(device).total_memory
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4.0 * 2**30
