"""Training checkpoints on disk: resume from the newest one that reads back, set damaged ones aside,
delete them all once a run has finished.

A checkpoint is an orbax step folder, `<workdir>/checkpoints/<stage>/<step>/`. Orbax writes it under
a temporary name and renames it when complete, so a write cut short never looks like a step; a
step folder can still lose files or have them truncated afterwards (a full disk, a copy cut short,
an object store without atomic renames). `restore_newest_intact` tries the steps newest first; the
ones that fail to read are moved to `<workdir>/checkpoints/damaged/<stage>/<step>` (kept for
inspection, out of orbax's way) with one warning line each. If none reads, it raises
`NoIntactCheckpoint` and changes nothing on disk.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from lard_jax.errors import UserError

DAMAGED = "damaged"


class NoIntactCheckpoint(UserError):
    """Every checkpoint of a stage fails to read back."""


def _reason(e: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def damaged_dir(ckpt_dir: str) -> str:
    """<workdir>/checkpoints/damaged/<stage> for <workdir>/checkpoints/<stage>."""
    return os.path.join(os.path.dirname(ckpt_dir), DAMAGED, os.path.basename(ckpt_dir))


def restore_newest_intact(
    manager, restore: Callable[[int], object], *, stage: str, agree: Callable[[bool], bool] | None = None
):
    """(step, restored) of the newest of `manager`'s steps that `restore(step)` reads back, or
    (None, None) when there is none at all. Damaged newer steps are moved aside (process 0) and
    `manager` reloaded, each with a warning naming the step and why it failed. `agree(ok)`: all
    processes' verdict on a step (multi-host: a step counts as intact only if every process read it)."""
    from lard_jax import cli

    ckpt_dir = os.fspath(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None, None
    failed: list[tuple[int, str]] = []
    for step in steps:
        why = "does not read back on another process"
        try:
            restored, ok = restore(step), True
        except Exception as e:  # noqa: BLE001 -- any read failure: try the next older step
            restored, ok, why = None, False, _reason(e)
        if agree is not None:
            ok = agree(ok)
        if ok:
            break
        failed.append((step, why))
    else:
        tried = "; ".join(f"step {s}: {why}" for s, why in failed)
        raise NoIntactCheckpoint(
            f"{ckpt_dir}: no checkpoint of {stage} reads back ({tried}); nothing was changed; restore the "
            f"folder from a copy, or move it away to train {stage} from step 0"
        )
    if failed:
        import jax

        aside = damaged_dir(ckpt_dir)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for bad, _ in failed:
                target = os.path.join(aside, str(bad))
                if os.path.exists(target):
                    target += f".{int(time.time())}"
                os.replace(os.path.join(ckpt_dir, str(bad)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"lard_jax.checkpoints.set_aside.{stage}")
        manager.reload()
        for bad, why in failed:
            cli.warn(
                f"{ckpt_dir}: checkpoint step {bad} of {stage} does not read back ({why}); skipped, moved to "
                f"{os.path.join(aside, str(bad))}; resuming from step {step}"
            )
    return step, restored


def delete_training_checkpoints(workdir: str) -> str | None:
    """Remove <workdir>/checkpoints (process 0); returns the path removed, or None if none existed."""
    import jax

    path = os.path.join(workdir, "checkpoints")
    if jax.process_index() != 0 or not os.path.isdir(path):
        return None
    shutil.rmtree(path)
    return path
