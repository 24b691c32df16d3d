"""Print CMake `set()` lines describing the torch installed in this Python environment.

CMake runs this instead of `find_package(Torch)`: the Caffe2 CMake config insists on CUDA
libraries (cuSPARSE, cuBLAS, cuDNN headers) that a plain CUDA toolkit may lack, while we only
need torch's headers and its core libraries.
"""
import os

import torch
import torch.utils.cpp_extension as ext

root = os.path.dirname(torch.__file__)
lines = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_INCLUDE_DIRS": ";".join(ext.include_paths()),
    "TORCH_LIBRARY_DIR": os.path.join(root, "lib"),
    "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
}
for key, value in lines.items():
    print(f'set({key} "{value}")')
