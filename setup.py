"""Build the optional C extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "serving.models._qmm",
            # _cpu_ops.c: the fused norm / rotary / SiLU / decode attention kernels, in the same module
            # so that they share _qmm.c's thread pool (through _qmm_shared.h).
            ["serving/models/_qmm.c", "serving/models/_cpu_ops.c"],
            depends=["serving/models/_qmm_shared.h", "serving/models/_avx2_reduce.h"],
            define_macros=[("QMM_WITH_CPU_OPS", "1")],
            # No -march: the AVX2 code carries target attributes and is picked at import time, so the
            # wheel runs on any x86-64. No FMA contraction: the scalar code rounds as written.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
            # Without a C compiler the install still succeeds; FleetLM falls back to torch kernels.
            optional=True,
        )
    ],
)
