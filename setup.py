"""Builds the compiled CPU extension ``fastsae._C`` from ``csrc/``.

Follows pytorch/extension-cpp: ops are declared with TORCH_LIBRARY (no pybind11), so the
extension builds against Python's limited API and one wheel serves every CPython >= 3.9.
CUDA sources (``csrc/cuda/*.cu``) are compiled only when torch has CUDA and nvcc is found,
or when ``FASTSAE_BUILD_CUDA=1``; ``FASTSAE_BUILD_CUDA=0`` forces a CPU-only build.
``FASTSAE_NO_EXT=1`` skips the extension entirely (the package then runs on eager/Triton).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTSAE_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("FASTSAE_BUILD_CUDA", "auto").lower()
    if flag == "auto":
        use_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    else:
        use_cuda = flag in ("1", "true", "yes")

    debug = os.environ.get("FASTSAE_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-std=c++17", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    if os.environ.get("FASTSAE_NATIVE", "0") == "1":
        cxx.append("-march=native")  # local builds only: a wheel must run on any x86-64

    # Paths relative to setup.py: setuptools refuses absolute source paths in wheels.
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], py_limited_api=True)
    if use_cuda:
        sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        kwargs["extra_compile_args"]["nvcc"] = opt
        ext = CUDAExtension("fastsae._C", sources, **kwargs)
    else:
        ext = CppExtension("fastsae._C", sources, **kwargs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
