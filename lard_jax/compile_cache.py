"""JAX's persistent compilation cache in a run's workdir, and a counter of XLA compilations.

`enable_compilation_cache(workdir)` points JAX at `<workdir>/jax_compilation_cache` and lowers
the thresholds so that every program is written there (by default JAX keeps only programs that
took over a second to compile): a second process evaluating the same model shapes -- the next
row of a table, a resumed run -- loads its executables instead of compiling them. Call it before
the first compilation you want cached (it also works later: programs compiled before it are just
not in the cache). The cache is trusted: never point it at a directory others can write to.

`CompileCounter` counts, through `jax.monitoring`, the XLA compilations of the process while it
is active (backend compiles, and how many of them were persistent-cache hits).
"""

from __future__ import annotations

import os
import threading

import jax

__all__ = [
    "CACHE_SUBDIR",
    "enable_compilation_cache",
    "disable_compilation_cache",
    "compilation_cache_dir",
    "CompileCounter",
]

CACHE_SUBDIR = "jax_compilation_cache"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_TRACE_AND_LOWER = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")


def compilation_cache_dir() -> str | None:
    """The persistent cache directory in effect (None: no persistent cache)."""
    try:
        return jax.config.jax_compilation_cache_dir
    except AttributeError:  # a JAX whose config has no attribute access
        from jax._src import config as jax_config

        return jax_config.compilation_cache_dir.value


def enable_compilation_cache(workdir: str, *, subdir: str = CACHE_SUBDIR) -> str:
    """Use `<workdir>/<subdir>` (created) as JAX's persistent compilation cache, for every program
    however small or fast to compile. Returns the directory. Idempotent; a different directory
    than the one in effect replaces it."""
    path = os.path.abspath(os.path.join(workdir, subdir) if subdir else workdir)
    os.makedirs(path, exist_ok=True)
    previous = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold
    if previous and os.path.abspath(previous) != path:
        _reset_cache()  # JAX opens the cache directory once; let it open the new one
    return path


def disable_compilation_cache() -> None:
    """No persistent cache from now on (tests restore the global state with it)."""
    jax.config.update("jax_compilation_cache_dir", None)
    _reset_cache()


def _reset_cache() -> None:
    try:
        from jax._src import compilation_cache as cc

        cc.reset_cache()
    except Exception:  # noqa: BLE001  (a private API: without it a new directory applies in new processes)
        pass


class CompileCounter:
    """Counts XLA compilations while active (a context manager; nestable, thread-safe).

    `compiles`: programs compiled by XLA (persistent-cache hits excluded); `cache_hits`: programs
    loaded from the persistent cache; `seconds`: wall time in XLA compilation (hits included);
    `names`: the jitted function names compiled; `trace_seconds`: wall time tracing to a jaxpr and
    lowering to MLIR (Python-side work before XLA, paid even on a persistent-cache hit)."""

    def __init__(self):
        self.backend_calls = 0
        self.cache_hits = 0
        self.seconds = 0.0
        self.trace_seconds = 0.0
        self.names: list[str] = []
        self._lock = threading.Lock()
        self._active = False

    @property
    def compiles(self) -> int:
        return self.backend_calls - self.cache_hits

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if self._active and event in _TRACE_AND_LOWER:
            with self._lock:
                self.trace_seconds += float(duration)
        if self._active and event == _BACKEND_COMPILE:
            with self._lock:
                self.backend_calls += 1
                self.seconds += float(duration)
                self.names.append(str(kwargs.get("fun_name", "?")))

    def _on_event(self, event: str, **kwargs) -> None:
        if self._active and event == _CACHE_HIT:
            with self._lock:
                self.cache_hits += 1

    def snapshot(self) -> dict:
        return {
            "compiles": self.compiles,
            "cache_hits": self.cache_hits,
            "compile_seconds": round(self.seconds, 3),
            "trace_seconds": round(self.trace_seconds, 3),
        }

    def __enter__(self) -> CompileCounter:
        self._active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for name, fn in (
            ("unregister_event_duration_listener", self._on_duration),
            ("unregister_event_listener", self._on_event),
        ):
            unregister = getattr(jax.monitoring, name, None)
            if unregister is not None:
                try:
                    unregister(fn)
                except (ValueError, KeyError, AssertionError):
                    pass
