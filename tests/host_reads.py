"""Host reads of device values by tbg code, for the tests of the Triton ops' synchronisation contracts."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch


class HostReads(torch.overrides.TorchFunctionMode):
    """Records the torch calls of tbg code that read tensor values on the host (on a GPU: synchronise)
    and the tensor factories called without a device (they would land on the CPU next to CUDA inputs).
    Reads inside the function `allowed_in` = (function name, module name), which may own a call's one
    host copy, are recorded apart (``allowed``) from the others (``reads``)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero,
             torch.repeat_interleave, torch.Tensor.repeat_interleave, torch.masked_select, torch.unique}
    FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor,
                 torch.rand, torch.randn, torch.eye}

    def __init__(self, allowed_in: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.allowed_in = allowed_in
        self.allowed: list[str] = []
        self.reads: list[str] = []
        self.missing_device: list[str] = []

    def _in_allowed(self) -> bool:
        frame = sys._getframe(2)
        while frame is not None and self.allowed_in is not None:
            if (frame.f_code.co_name, frame.f_globals.get("__name__")) == self.allowed_in:
                return True
            frame = frame.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("tbg."):  # not the interpreter's copies of the kernel arguments
            if func in self.READS:
                (self.allowed if self._in_allowed() else self.reads).append(f"{caller}.{func.__name__}")
            if func in self.FACTORIES and kwargs.get("device") is None:
                self.missing_device.append(func.__name__)
        return func(*args, **kwargs)


def cuda_syncs(call: Callable[[], object]) -> list[str]:
    """The host-device synchronisations of call() on CUDA, by torch's sync debug mode."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]
