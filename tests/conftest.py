"""Test-wide setup: 8 fake CPU devices (for mesh tests), float32 matmuls at full precision, XLA:CPU
flags that make the tests' tiny programs compile faster, and the same flags for the Python
subprocesses tests start (training command lines, jax.distributed hosts, notebook kernels:
`cpu_env`, `with_site_flags`).

The tests' programs are tiny, so their time is mostly compilation. Two flags make XLA:CPU compile
faster; neither changes the HLO, only the machine code, so float32 results can differ in the last
bits, which every comparison's tolerance covers (one was loosened), and comparisons of two programs
compiled in one setup stay exact:

* `--xla_backend_optimization_level=0`: LLVM at level 0 (took the suite from 19m17s to 16m12s
  while other work shared the cores). Programs run slower (up to 3x), so a test whose time is
  running them (the quickstart notebook's evaluation) leaves both flags out.
* `--xla_cpu_use_fusion_emitters=false`: fusions emitted by XLA's older elemental emitters instead
  of the MLIR fusion emitters. With level 0, a quarter less time again (tests/test_scan.py,
  test_layer_scan.py, test_scan_cost.py and test_relation_kl_tpu.py 295 s -> 215 s on 2 shared
  cores; test_relation_kl.py with test_relation_kl_tpu.py 221 s -> 161 s), run time about the
  same; at XLA's default level it compiles slower, so the two go together. An XLA that does not
  know the flag aborts at its first compilation: it is checked in a throwaway Python first
  (`supported`).

A caller's own XLA_FLAGS that name a flag keep its value. Set here before jax is imported;
pytest-xdist's workers inherit the result (the check runs once, in the first process)."""

import os
import subprocess
import sys

OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
NO_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
FAST_COMPILE = (OPT_LEVEL_0, NO_FUSION_EMITTERS)


def _name(flag: str) -> str:
    return flag.split("=")[0]


def with_flags(xla_flags: str, flags) -> str:
    """`xla_flags` plus each of `flags` whose name it does not set already."""
    for flag in flags:
        if _name(flag) not in xla_flags:
            xla_flags = f"{xla_flags} {flag}".strip()
    return xla_flags


def supported(flag: str) -> bool:
    """Whether this jaxlib's XLA knows `flag` (a Python that starts a CPU backend with it)."""
    code = "import jax; jax.devices()"
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode == 0


def in_effect() -> tuple:
    """The FAST_COMPILE flags this process's XLA_FLAGS carry (set below)."""
    return tuple(f for f in FAST_COMPILE if f in os.environ.get("XLA_FLAGS", ""))


FAST_COMPILE_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fast_compile_site")
SITE_FLAGS_VAR = "LARD_TESTS_ADD_XLA_FLAGS"


def cpu_env(devices: int | None = None, flags=None, **extra: str) -> dict:
    """os.environ for a CPU subprocess: `devices` fake CPU devices (None: one), `flags` (default:
    the FAST_COMPILE flags in effect here), `extra` on top.

    JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES is emptied: with a persistent compilation cache, JAX by
    default writes `<cache dir>/xla_gpu_per_fusion_autotune_cache_dir` (a GPU-only option) into
    every program's compile options, hence into every cache key, so a cache copied from another
    workdir never hits. Empty: no XLA-side caches, the key is the program's, a seeded cache is used."""
    flags = in_effect() if flags is None else flags
    count = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(count + list(flags)),
        JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES="",
    )
    env.update(extra)
    return env


def with_site_flags(env: dict, flags) -> dict:
    """`env` for a Python whose subprocesses set XLA_FLAGS themselves (a notebook's runs): every
    Python started with it or from it adds `flags` to whatever XLA_FLAGS it has, through
    FAST_COMPILE_SITE's sitecustomize.py on PYTHONPATH."""
    path = env.get("PYTHONPATH", "")
    return dict(
        env,
        PYTHONPATH=FAST_COMPILE_SITE + (os.pathsep + path if path else ""),
        **{SITE_FLAGS_VAR: " ".join(flags)},
    )


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] = with_flags(os.environ["XLA_FLAGS"], [OPT_LEVEL_0])
if _name(NO_FUSION_EMITTERS) not in os.environ["XLA_FLAGS"] and supported(NO_FUSION_EMITTERS):
    os.environ["XLA_FLAGS"] += " " + NO_FUSION_EMITTERS
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Modules with a test marked slow (a whole training run: 15-80 s) run first, each module's
    tests together and in their order: pytest-xdist hands tests out in this order, so its workers
    end on short tests rather than one idling while the other finishes a whole-run test."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the same order on every worker
