"""Triton implementations of tbg operators on CUDA, opt-in through the environment variable TBG_TRITON.

TBG_TRITON is a comma-separated list of operator groups to serve with Triton kernels on CUDA:

    TBG_TRITON=divergence   tbg::egnn_divergence and tbg::egnn_jvp (tbg.nn.triton.divergence)
    TBG_TRITON=egnn         tbg::egnn_forward and tbg::egnn_backward (tbg.nn.triton.egnn), in place of
                            the .cu kernels

A group becomes the default CUDA path only after it has passed the CUDA tests on a GPU; until then it
is opt-in. Triton is an optional dependency: this package imports nothing from it until a group is
requested, and ``tbg info`` shows which implementation each op takes. ``serving`` registers a group for
one block of code (tests and benchmarks that compare implementations in one process).

The kernel modules run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
they are imported), which is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple

import torch

log = logging.getLogger("tbg")

ENV = "TBG_TRITON"


class Group(NamedTuple):
    module: str           # the module holding the kernels and the op implementations
    ops: tuple[str, ...]  # torch.ops.tbg operators it implements (functions of the same names)


GROUPS: dict[str, Group] = {
    "divergence": Group("tbg.nn.triton.divergence", ("egnn_divergence", "egnn_jvp")),
    "egnn": Group("tbg.nn.triton.egnn", ("egnn_forward", "egnn_backward")),
}


def requested() -> tuple[str, ...]:
    """The groups TBG_TRITON asks for (unknown names are logged and skipped)."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        if name not in GROUPS:
            log.warning("%s=%s: %r is not a group; known groups: %s", ENV, os.environ[ENV], name, ", ".join(GROUPS))
    return tuple(dict.fromkeys(n for n in names if n in GROUPS))


def triton_status() -> str | None:
    """None when Triton can be imported, else why not."""
    try:
        importlib.import_module("triton")
    except ModuleNotFoundError:
        return "triton is not installed"
    except Exception as err:  # noqa: BLE001 - any import failure means Triton cannot serve
        return f"importing triton failed: {err}"
    return None


def triton_version() -> str | None:
    """Triton's version, None when it cannot be imported."""
    return None if triton_status() is not None else importlib.import_module("triton").__version__


def cuda_implementations() -> dict[str, Callable[..., Any]]:
    """The Triton implementation of every op in the groups TBG_TRITON asks for, keyed by op name
    (tbg.nn.ops installs them as the CUDA kernels). Without Triton: none, and a warning says why."""
    groups = requested()
    if not groups:
        return {}
    problem = triton_status()
    if problem is not None:
        log.warning("%s=%s is ignored: %s", ENV, os.environ[ENV], problem)
        return {}
    implementations = {}
    for name in groups:
        module = importlib.import_module(GROUPS[name].module)
        implementations.update({op: getattr(module, op) for op in GROUPS[name].ops})
    return implementations


@contextlib.contextmanager
def serving(group: str, device: str | torch.device) -> Iterator[None]:
    """Inside the block the ops of `group` dispatch to their Triton implementation for tensors on
    `device` ("cuda", or "cpu" where the kernels were imported under TRITON_INTERPRET=1), whatever
    TBG_TRITON says: a scoped torch.library registration for the device's dispatch key, removed on exit,
    after which the kernels registered before serve again. For tests and benchmarks that compare
    implementations in one process."""
    module = importlib.import_module(GROUPS[group].module)
    key = torch.device(device).type.upper()
    library = torch.library.Library("tbg", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # overriding the kernel registered for the key
            for op in GROUPS[group].ops:
                library.impl(op, getattr(module, op), key)
        yield
    finally:
        library._destroy()
