"""Build script for ompq: the Python package plus the `ompq._C` torch extension.

Build with `pip install --no-build-isolation -e .` so the installed torch (2.13.0, CPU wheel) is
used; an isolated build environment would fetch a different torch.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("OMPQ_NO_CUDA", "0") != "1"
    )
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -ffp-contract=off: no FMA contraction, so kernels round exactly like torch's elementwise ops.
    # No -std: torch's BuildExtension adds the C++ standard its headers need (C++17 up to torch
    # 2.11, C++20 from 2.12); the sources build under both.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("OMPQ_PORTABLE", "0") != "1":
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    # --exclude-libs,ALL: if the toolchain links a static libstdc++ into _C.so (some compiler
    # wrappers add -static-libstdc++), keep that copy private. Otherwise the loader binds half of
    # it (locale data) to the process's libstdc++.so and half (code) to the copy, and streaming a
    # number into an error message crashes (seen with torch 2.11 on a CUDA image).
    link = ["-fopenmp", "-Wl,--exclude-libs,ALL"]
    if use_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_glue.cpp")
        # No --use_fast_math: it flushes denormals (scales down to ~3e-39 are valid) and changes
        # floor(w / s); the kernels use round-to-nearest intrinsics, so nothing is contracted.
        extra["nvcc"] = ["-O3"]
        define_macros.append(("OMPQ_WITH_CUDA", "1"))
        return CUDAExtension("ompq._C", sources, extra_compile_args=extra,
                             define_macros=define_macros, py_limited_api=True,
                             extra_link_args=link)
    return CppExtension("ompq._C", sources, extra_compile_args=extra,
                        define_macros=define_macros, py_limited_api=True,
                        extra_link_args=link)


setup(
    name="ompq",
    version="0.1.0",
    description="Fast, model-agnostic mixed-precision quantization (OMPQ: orthogonality + ILP)",
    packages=find_packages(include=["ompq", "ompq.*"]),
    package_data={"ompq.zoo": ["checkpoints/*.pt", "checkpoints/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",  # torch.library.register_fake
        "numpy",
        "ortools>=9.8",
        "tqdm",
        "matplotlib",
        "scipy",
        "onnx",          # ompq demo / export --onnx write and check an ONNX model
        "onnxruntime",
    ],
    extras_require={
        "export": [],    # kept for old install commands; onnx is now a core dependency
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    entry_points={"console_scripts": ["ompq=ompq.cli:main"]},
)
