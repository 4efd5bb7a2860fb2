"""Compiling a Triton kernel to PTX for an H100/H200 (sm_90) on a machine with no GPU, as a GPU run
would build it: the compile tests' one way to do it, so a lent GPU meets no compile error (nor a
kernel whose registers spill to local memory, which would run it several times slower)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

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
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    stack = _stack_bytes(compiled.asm.get("cubin"))
    assert stack in (None, 0), f"{kernel.__name__} {constants} {options}: registers spill ({stack} bytes of stack a thread)"
    return compiled.asm["ptx"]


def _stack_bytes(cubin: bytes | None) -> int | None:
    """Bytes of stack a thread of the cubin's kernel uses: nonzero where ptxas spilled registers to
    local memory. None where the cubin or Triton's cuobjdump is not there to tell."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"STACK:(\d+)", usage)
    return int(match.group(1)) if match else None
