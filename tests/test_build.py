"""The native library: built, loadable, and consistent with the torch it runs under."""
import subprocess
import sys

import torch

import tbg


def test_library_loads_and_registers_ops() -> None:
    info = tbg.build_info()
    for op in ("egnn_forward", "egnn_backward", "egnn_divergence", "egnn_jvp"):
        assert op in info["ops"]
        assert hasattr(torch.ops.tbg, op)


def test_build_info_is_consistent_with_torch() -> None:
    info = tbg.build_info()
    assert set(info) >= {"torch", "cuda", "cuda_arch"}
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"] is None:
        assert info["cuda_arch"] == []
    else:
        # CUDA sources were compiled: torch must be a CUDA build and the arch list non-empty.
        assert torch.version.cuda is not None
        assert info["cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_arch"]
        assert all(arch.startswith(("sm_", "compute_")) for arch in info["cuda_arch"])


def test_import_under_other_torch_fails_clearly() -> None:
    # Run tbg under a torch that reports another version: the import must refuse and say how to rebuild.
    code = (
        "import torch\n"
        "torch.__version__ = '1.0.0'\n"
        "try:\n"
        "    import tbg\n"
        "except ImportError as e:\n"
        "    print('REFUSED', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "REFUSED" in out and "1.0.0" in out and "--no-build-isolation" in out
