"""XLA's settings for the suite and its subprocesses.

The suite compiles hundreds of small programs and runs each on tiny arrays, two test
processes at a time on two cores: LLVM's optimisation passes cost more than they save,
and so do the threads Eigen would start inside each program. These settings change no
result the tests rely on beyond the last bits of floating-point arithmetic, with one
exception: the reversible adjoint's exact rewind through a float64 `ConvCell`
(`tests/nn/test_cells.py` runs that cell in the flat mode).
"""

SUITE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    # XLA's older CPU fusion code generator: about half the compile time of the MLIR-based
    # one on the suite's programs.
    "--xla_cpu_use_fusion_emitters=false",
    # One thread per program: the cores are shared by the test processes already.
    "--xla_cpu_multi_thread_eigen=false",
)


def with_suite_flags(flags: str) -> str:
    """`flags` (an `XLA_FLAGS` value) with `SUITE_XLA_FLAGS` appended where missing."""
    return " ".join([flags, *(f for f in SUITE_XLA_FLAGS if f not in flags)]).strip()
