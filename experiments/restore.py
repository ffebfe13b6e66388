"""LinearARD restoration: `python -m experiments.restore --config=configs/<name>.py [--config.x.y=...]`.

`--help` lists every config key with its default and one line of help; a user mistake prints one
line, `error: <what>: <why>; <how to fix>`, and exits 2 (`--debug` adds the traceback).
"""

import os
import sys

from lard_jax import cli

ABOUT = "Restore a RoPE-scaled LLaMA-family model by LinearARD self-distillation (see README.md)."


def _run(config) -> None:
    from lard_jax.pipeline import run_restoration  # after flag parsing: --help and flag errors stay instant

    run_restoration(config)


def main(argv=None) -> int:
    return cli.run_main(
        sys.argv if argv is None else argv,
        _run,
        prog="experiments.restore",
        default_config=os.path.join(cli.ROOT, "configs", "base.py"),
        about=ABOUT,
        config_required_hint="pass --config=configs/demo.py, or a config of your own (configs/base.py lists every key)",
    )


if __name__ == "__main__":
    sys.exit(main())
