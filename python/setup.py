"""Builds scattermoe._C: the torch binding (csrc/) compiled together with the library sources.

The CPU build needs only a C++17 compiler. SCATTERMOE_CUDA=1 adds the CUDA backend
(../src/cuda/*.cu, CUTLASS headers from SCATTERMOE_CUTLASS_INCLUDE_DIR or
../third_party/cutlass/include) for the architectures in SCATTERMOE_CUDA_ARCHS ("80;90a"),
with the flags and defines that CMakeLists.txt gives the same sources. Compilation runs in
parallel through ninja when it is installed (MAX_JOBS caps the jobs).
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VERSION = "0.1.0"
SM90_ARCH = "90a"  # the wgmma kernels (src/cuda/sm90_*.cu) are built for this arch alone


def sources(*patterns, exclude=()):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(ROOT, pattern)))
    skip = {path for pattern in exclude for path in glob.glob(os.path.join(ROOT, pattern))}
    # setuptools refuses absolute source paths: name them from this folder ("../src/...").
    return [os.path.relpath(path, HERE) for path in found if path not in skip]


def gencode(archs):
    """As CMake's CUDA_ARCHITECTURES gives them: SASS and PTX of each arch."""
    return [f"-gencode=arch=compute_{a},code={code}_{a}" for a in archs
            for code in ("sm", "compute")]


def nvcc_flags(cutlass):
    """The options CMakeLists.txt gives the library's CUDA sources, without the archs."""
    # torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends to every nvcc line; the CMake build
    # has the cuda_fp16 / cuda_bf16 operators and conversions, so undo them.
    torch_undefs = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    # NDEBUG matters: with asserts on, CUTLASS serialises its tensor-core pipelines.
    return (["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "-isystem", cutlass]
            + torch_undefs)


def link_flags():
    """A compiler whose libstdc++ is a static archive (some toolchains ship only that) puts a
    copy of it into the extension, beside the shared one torch loads. With the interpreter's
    -Bsymbolic-functions, the copy's functions would then meet the shared copy's data (the
    locale facet ids): the first std::ostream number format crashes (SIGSEGV). Keeping every
    symbol from static archives local makes such a copy self-contained; with a shared
    libstdc++ the flag changes nothing."""
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def extension():
    cxx_flags = ["-O3", "-std=c++17", f'-DSCATTERMOE_VERSION="{VERSION}"']
    include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "src"),
                    os.path.join(HERE, "csrc")]
    cpp_sources = sources("python/csrc/*.cpp", "src/core/*.cpp", "src/cpu/*.cpp")
    if os.environ.get("SCATTERMOE_CUDA", "0") != "1":
        return CppExtension("scattermoe._C", cpp_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags())

    cutlass = os.environ.get("SCATTERMOE_CUTLASS_INCLUDE_DIR",
                             os.path.join(ROOT, "third_party", "cutlass", "include"))
    if not os.path.exists(os.path.join(cutlass, "cute", "tensor.hpp")):
        raise RuntimeError(f"CUTLASS headers not found in {cutlass}: run scripts/install-cutlass "
                           "or set SCATTERMOE_CUTLASS_INCLUDE_DIR")
    archs = [a for a in os.environ.get("SCATTERMOE_CUDA_ARCHS", "80;90a").split(";") if a]
    defines = ["-DSCATTERMOE_WITH_CUDA", f'-DSCATTERMOE_CUDA_ARCHS="{",".join(archs)}"']
    sm90 = []
    if SM90_ARCH in archs:
        sm90 = sources("src/cuda/sm90_*.cu")
        defines.append("-DSCATTERMOE_HAS_SM90")
    ext = CUDAExtension("scattermoe._C",
                        cpp_sources + sources("src/cuda/*.cu", exclude=["src/cuda/sm90_*.cu"]),
                        include_dirs=include_dirs,
                        extra_compile_args={
                            "cxx": cxx_flags + defines,
                            "nvcc": nvcc_flags(cutlass) + gencode(archs) + defines
                                    + [f'-DSCATTERMOE_VERSION="{VERSION}"']},
                        extra_link_args=link_flags())
    # Compiled apart by BuildWithArchGroups, for sm_90a alone (CMake's scattermoe_sm90 target).
    ext.arch_groups = [(sm90, nvcc_flags(cutlass) + gencode([SM90_ARCH]))] if sm90 else []
    return ext


class BuildWithArchGroups(BuildExtension):
    """BuildExtension gives every CUDA source of an extension the same nvcc flags; the sources
    in ext.arch_groups [(sources, nvcc flags)] are compiled first with their own flags (one more
    ninja run each), and their objects linked in with the others."""

    def build_extension(self, ext):
        for group_sources, group_flags in getattr(ext, "arch_groups", []):
            # torch's additions to ext's nvcc flags (extension name, ABI), without its archs.
            torch_flags = [f for f in ext.extra_compile_args["nvcc"]
                           if f.startswith(("-DTORCH_", "-D_GLIBCXX_USE_CXX11_ABI"))]
            ext.extra_objects += self.compiler.compile(
                group_sources, output_dir=self.build_temp, include_dirs=ext.include_dirs,
                debug=self.debug, depends=ext.depends,
                extra_postargs={"cxx": ext.extra_compile_args["cxx"],
                                "nvcc": group_flags + torch_flags})
        super().build_extension(ext)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildWithArchGroups})
