"""The one error type for user mistakes: bad configs, unreadable checkpoints, unusable data.

Entry points catch `UserError` and print it as one line, `error: <what>: <why>; <how to fix>`,
and exit 2 (a traceback only with `--debug`). Anything else that escapes is a bug in lard_jax.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the input, the problem and the fix."""
