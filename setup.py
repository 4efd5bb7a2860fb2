"""Build the optional C extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "serving.models._qmm",
            ["serving/models/_qmm.c"],
            # No -march: the AVX2 code carries target attributes and is picked at import time, so the
            # wheel runs on any x86-64. No FMA contraction: the scalar code rounds as written.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
            # Without a C compiler the install still succeeds; FleetLM falls back to torch kernels.
            optional=True,
        )
    ],
)
