"""LinearARD restoration: `python -m experiments.restore --config=configs/<name>.py [--config.x.y=...]`."""
from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from lard_jax.pipeline import ConfigError, run_restoration

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)


def main(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run_restoration(_CONFIG.value)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
