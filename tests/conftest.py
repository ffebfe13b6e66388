"""Test-wide setup: 8 fake CPU devices (for mesh tests), float32 matmuls at full precision, and
XLA:CPU's LLVM backend at optimization level 0.

The tests' programs are tiny, so their time is mostly compilation: level 0 took a third off
tests/test_scan.py and test_layer_scan.py (161 -> 104 s on 2 cores) and the suite from 19m17s to
16m12s while other work shared the cores. It changes no HLO, only the machine code: float32 results
can differ in the last bits, which every comparison's tolerance covers (one was loosened);
comparisons of two compiled programs stay exact. A caller's own XLA_FLAGS keep their level."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
