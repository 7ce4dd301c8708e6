"""Build shim. Metadata lives in pyproject.toml.

The optional CUDA extension in csrc/ is built only when IIDKERN_BUILD_CUDA=1; it then needs a
CUDA toolkit (nvcc, CUDA_HOME) and torch in the build environment (pip install
--no-build-isolation; csrc/README.md), and fails without them. The Triton kernels need no
build step.
"""
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("IIDKERN_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [CUDAExtension("iidkern._C", ["csrc/tile_classify.cu"],
                                 extra_compile_args={"nvcc": ["-O3", "-gencode=arch=compute_90,code=sm_90"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
