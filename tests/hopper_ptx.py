"""Compiling a Triton kernel to PTX for an H100/H200 (sm_90) on a machine with no GPU, as a GPU run
would build it: the compile tests' one way to do it, so a lent GPU meets no compile error."""

from __future__ import annotations

import pytest


def sm90_ptx(kernel, arguments: dict[str, str], constants: dict, aligned: list[str], options: dict) -> str:
    """The kernel's PTX. arguments: each runtime argument's Triton type, in the kernel's order;
    constants: each constexpr's value; aligned: the arguments assumed divisible by 16, as Triton's
    launcher specializes them on a GPU. Skips the test where this triton has no CUDA backend."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend")
    signature = {**arguments, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
