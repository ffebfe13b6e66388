"""The host side of skipping non-finite steps: count them, warn for each, stop past the limit.

The jitted step (lard_jax.trainer.make_train_step) never applies an update whose loss or gradient
norm is non-finite: it keeps the parameters and optimizer state, counts the step in
`TrainState.skipped` and reports `skipped` = 1 in its metrics. `SkippedSteps` holds those per-step
metrics as device arrays and reads them only when the loop reads metrics anyway (a log step) or
before a checkpoint, so skipping adds no host synchronisation. Past `limit` skipped steps it raises
`NonFiniteSteps`, naming the step, before anything of that step is written: the newest checkpoint
on disk then holds the last finite parameters (a skipped step changes nothing).
"""

from __future__ import annotations

from lard_jax.errors import UserError


class NonFiniteSteps(UserError):
    """More steps than config.train.max_skipped_steps had a non-finite loss or gradient norm."""


class SkippedSteps:
    def __init__(self, stage: str, limit: int, already: int = 0, warn=None):
        self.stage, self.limit, self.count = stage, int(limit), int(already)
        self._warn = warn  # a one-line warning writer (default: lard_jax.cli.warn)
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        """`metrics` of `step` (1-based), device arrays: kept, not read."""
        if "skipped" in metrics:
            self._pending.append((step, {k: metrics[k] for k in ("skipped", "loss", "grad_norm") if k in metrics}))

    def check(self, newest_checkpoint) -> None:
        """Read the kept metrics; a warning per skipped step; `NonFiniteSteps` past the limit.
        `newest_checkpoint()`: the newest step on disk (for the message), called only then."""
        if not self._pending:
            return
        import jax

        from lard_jax import cli

        pending, self._pending = jax.device_get(self._pending), []
        for step, m in pending:
            if not float(m["skipped"]):
                continue
            self.count += 1
            loss, gnorm = (float(m.get(k, float("nan"))) for k in ("loss", "grad_norm"))
            what = f"loss {loss:.4g}, gradient norm {gnorm:.4g}"
            if self.count > self.limit:
                last = newest_checkpoint()
                kept = (
                    f"its newest checkpoint (step {last}) holds the last finite parameters"
                    if last is not None
                    else "no checkpoint was written"
                )
                raise NonFiniteSteps(
                    f"{self.stage} step {step}: non-finite {what}; {self.count} such steps, more than "
                    f"config.train.max_skipped_steps={self.limit}; the run stopped and {kept}; lower "
                    "config.train.lr or check the training text around that step, or raise "
                    "config.train.max_skipped_steps and rerun to resume"
                )
            (self._warn or cli.warn)(
                f"{self.stage} step {step}: non-finite {what}; update skipped, parameters unchanged "
                f"({self.count} of at most config.train.max_skipped_steps={self.limit})"
            )
