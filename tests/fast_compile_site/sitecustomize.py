"""Imported at the start of every Python that has this folder on PYTHONPATH (tests/conftest.py's
with_site_flags): adds the flags in $LARD_TESTS_ADD_XLA_FLAGS to XLA_FLAGS, each unless XLA_FLAGS
names it already. Runs before anything imports jax, so XLA reads them."""

import os

for _flag in os.environ.get("LARD_TESTS_ADD_XLA_FLAGS", "").split():
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
