"""Test-wide setup: 8 fake CPU devices (for mesh tests), float32 matmuls at full precision, XLA:CPU
flags that make the tests' tiny programs compile faster, and the same flags for the Python
subprocesses tests start (training command lines, jax.distributed hosts, notebook kernels:
`cpu_env`, `with_site_flags`); modules with slow tests first (`pytest_collection_modifyitems`).

The tests' programs are tiny, so their time is mostly compilation: XLA:CPU's LLVM backend at
optimization level 0 took a third off tests/test_scan.py and test_layer_scan.py (161 -> 104 s on 2
cores) and the suite from 19m17s to 16m12s while other work shared the cores. It changes no HLO,
only the machine code: float32 results can differ in the last bits, which every comparison's
tolerance covers (one was loosened); comparisons of two compiled programs stay exact. Programs
also run slower (up to 3x), so a test whose time is running them (the quickstart notebook's
evaluation) leaves the flag out. A caller's own XLA_FLAGS that name a flag keep its value."""

import os

OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
FAST_COMPILE = (OPT_LEVEL_0,)


def _name(flag: str) -> str:
    return flag.split("=")[0]


def in_effect() -> tuple:
    """The FAST_COMPILE flags this process's XLA_FLAGS carry (set below)."""
    return tuple(f for f in FAST_COMPILE if f in os.environ.get("XLA_FLAGS", ""))


def cpu_env(devices: int | None = None, **extra: str) -> dict:
    """os.environ for a CPU subprocess: `devices` fake CPU devices (None: one), the FAST_COMPILE
    flags in effect here, `extra` on top.

    JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES is emptied: with a persistent compilation cache, JAX by
    default writes `<cache dir>/xla_gpu_per_fusion_autotune_cache_dir` (a GPU-only option) into
    every program's compile options, hence into every cache key, so a cache copied from another
    workdir never hits. Empty: no XLA-side caches, the key is the program's, a seeded cache is used."""
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(count + list(in_effect())),
        JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="",
    )
    env.update(extra)
    return env


FAST_COMPILE_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fast_compile_site")


def with_site_flags(env: dict, flags) -> dict:
    """`env` for a Python whose subprocesses set XLA_FLAGS themselves (a notebook's runs): every
    Python started with it or from it adds `flags` to whatever XLA_FLAGS it has, through
    FAST_COMPILE_SITE's sitecustomize.py on PYTHONPATH."""
    path = env.get("PYTHONPATH", "")
    return dict(
        env,
        PYTHONPATH=FAST_COMPILE_SITE + (os.pathsep + path if path else ""),
        LARD_TESTS_ADD_XLA_FLAGS=" ".join(flags),
    )


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
for _flag in FAST_COMPILE:
    if _name(_flag) not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Modules with a test marked slow (a whole training run: 15-80 s) run first, each module's
    tests together and in their order: pytest-xdist hands tests out in this order, so its workers
    end on short tests rather than one idling while the other finishes a whole-run test."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the same order on every worker
