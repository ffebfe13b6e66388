"""Preemption: SIGTERM or SIGINT during training stops the run at a step boundary, with a checkpoint.

    with PreemptionGuard() as guard:
        for step in ...:
            state = train_step(state)                  # the step in flight finishes
            if guard.reached(step + 1):                # every step, on every process
                save_checkpoint(step + 1); raise guard.stopped("stage1", step + 1, ...)

One process (no `jax.distributed`): the guard's handlers only note the signal; the loop finishes
the step in flight, writes its checkpoint and raises `Preempted` (one line, exit status 143 for
SIGTERM, 130 for SIGINT). A second signal of the same kind while it does so ends the process at once.

Several processes (`jax.distributed.initialize`): XLA's coordination service owns SIGTERM (its
preemption notifier is installed by `jax.distributed.initialize`). A SIGTERM to any process is
propagated to all, and JAX's preemption sync manager picks the step every process saves at:
the largest step any process has reported plus one (`jax.experimental.multihost_utils.
reached_preemption_sync_point`, the mechanism orbax's CheckpointManager also reads). `reached(step)`
asks it, so it must be called at every step by every process, with the same step numbers. A SIGINT
to one process is turned into a SIGTERM to itself and so takes the same path. Nothing here
synchronises the processes while no notice is pending: the sync manager answers from local state.
"""

from __future__ import annotations

import os
import signal
import threading

from lard_jax.errors import UserError

EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class Preempted(UserError):
    """The run stopped on a preemption notice after writing a checkpoint; rerunning resumes it.
    `exit_code`: the status the command line exits with (128 + the signal's number)."""

    def __init__(self, message: str, exit_code: int = EXIT_CODES["SIGTERM"]):
        super().__init__(message)
        self.exit_code = exit_code


def jax_preemption_sync_available() -> bool:
    """True when `jax.distributed` is initialised with its preemption service (the default)."""
    try:
        from jax._src import distributed
    except ImportError:  # a JAX without the module: no coordination service
        return False
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class PreemptionGuard:
    """Context manager over a training loop; see the module docstring. Handlers are installed only
    from the main thread (Python delivers signals there) and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None  # the first signal this process received
        self.synced = jax_preemption_sync_available()
        self._previous: dict[int, object] = {}

    # -- handlers
    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.SIGNALS:
            if signum == signal.SIGTERM and self.synced:
                continue  # JAX's notifier handles it; a Python handler would replace it
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # a second notice: the sender insists, stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        # os.write, not print: the main thread may be inside a write to stderr (the progress bar)
        os.write(2, f"\n{name} received: finishing the step in flight, then writing a checkpoint\n".encode())
        if self.synced:  # let the coordination service tell every process
            os.kill(os.getpid(), signal.SIGTERM)

    # -- the loop's question
    def reached(self, step: int) -> bool:
        """Whether to checkpoint `step` (just finished) and stop. With several processes every
        process must ask at every step; they all get True at the same step."""
        if self.synced:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self.signal_name is not None

    def stopped(self, stage: str, step: int, steps: int, ckpt_dir: str) -> Preempted:
        """The one-line error to raise once `step`'s checkpoint is on disk."""
        what = self.signal_name or "a preemption notice (SIGTERM to one of the processes)"
        agreed = f" (the step agreed by all {jax_process_count()} processes)" if self.synced else ""
        return Preempted(
            f"{stage}: stopped by {what} after step {step} of {steps}{agreed}; its checkpoint is in {ckpt_dir}; "
            f"rerun the same command to resume from step {step}",
            exit_code=EXIT_CODES.get(self.signal_name or "SIGTERM", EXIT_CODES["SIGTERM"]),
        )


def jax_process_count() -> int:
    import jax

    return jax.process_count()
