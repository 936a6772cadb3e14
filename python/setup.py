"""Builds scattermoe._C: the torch binding (csrc/) compiled together with the library sources.

The CPU build needs only a C++17 compiler. SCATTERMOE_CUDA=1 adds the CUDA backend
(../src/cuda/*.cu, CUTLASS headers from SCATTERMOE_CUTLASS_INCLUDE_DIR or
../third_party/cutlass/include) for the architectures in SCATTERMOE_CUDA_ARCHS ("80;90a").
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSION = "0.1.0"


def sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    # setuptools refuses absolute source paths: name them from this folder ("../src/...").
    return [os.path.relpath(path, HERE) for path in found]


def extension():
    cxx_flags = ["-O3", "-std=c++17", f'-DSCATTERMOE_VERSION="{VERSION}"']
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "src"),
                    os.path.join(HERE, "csrc")]
    cpp_sources = sources("python/csrc/*.cpp", "src/core/*.cpp", "src/cpu/*.cpp")
    if os.environ.get("SCATTERMOE_CUDA", "0") != "1":
        return CppExtension("scattermoe._C", cpp_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})

    cutlass = os.environ.get("SCATTERMOE_CUTLASS_INCLUDE_DIR",
                             os.path.join(ROOT, "third_party", "cutlass", "include"))
    if not os.path.exists(os.path.join(cutlass, "cute", "tensor.hpp")):
        raise RuntimeError(f"CUTLASS headers not found in {cutlass}: run scripts/install-cutlass "
                           "or set SCATTERMOE_CUTLASS_INCLUDE_DIR")
    archs = os.environ.get("SCATTERMOE_CUDA_ARCHS", "80;90a").split(";")
    defines = ["-DSCATTERMOE_WITH_CUDA", f'-DSCATTERMOE_CUDA_ARCHS="{",".join(archs)}"']
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc_flags = (["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr",
                   f'-DSCATTERMOE_VERSION="{VERSION}"'] + defines + gencode)
    return CUDAExtension("scattermoe._C", cpp_sources + sources("src/cuda/*.cu"),
                         include_dirs=include_dirs + [cutlass],
                         extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags})


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
