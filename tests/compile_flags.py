"""XLA's compiler settings for the suite and its subprocesses.

The suite compiles hundreds of small programs and runs each on tiny arrays, so LLVM's
optimisation passes cost more than they save (about a third of the suite's CPU time).
They change no result the tests rely on beyond the last bits of floating-point arithmetic,
with one exception: the reversible adjoint's exact rewind through a float64 `ConvCell`
(`tests/nn/test_cells.py` runs that cell in the flat mode).
"""

FAST_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    # XLA's older CPU fusion code generator: about half the compile time of the MLIR-based
    # one on the suite's programs.
    "--xla_cpu_use_fusion_emitters=false",
)


def with_fast_compile(flags: str) -> str:
    """`flags` (an `XLA_FLAGS` value) with `FAST_COMPILE` appended where missing."""
    return " ".join([flags, *(f for f in FAST_COMPILE if f not in flags)]).strip()
