"""The native kernels' C extension; everything else about the package is in pyproject.toml.

sparsedge/runtimes/native/sparsedge_native.c is compiled into a plain shared library (loaded with
ctypes, no Python C API) without -march flags: the SIMD paths are selected at run time from the
CPU's features, so a wheel built on one machine runs on any x86-64 or aarch64 CPU.
"""

import sys

from setuptools import Extension, setup

_omp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]
_args = ["/O2", "/openmp"] if sys.platform == "win32" else ["-O3", "-std=c11", "-fvisibility=hidden", *_omp]

setup(
    ext_modules=[
        Extension(
            "sparsedge.runtimes.native._sparsedge_native",
            sources=["sparsedge/runtimes/native/sparsedge_native.c"],
            extra_compile_args=_args,
            extra_link_args=_omp,
            libraries=[] if sys.platform == "win32" else ["m"],
            py_limited_api=False,
        )
    ],
)
