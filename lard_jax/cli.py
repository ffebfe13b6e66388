"""The command line of the entry points (experiments/restore.py, experiments/evaluate.py).

    python -m experiments.restore --config=configs/demo.py --config.train.steps=10 [--debug]
    python -m experiments.restore --help        # every config key, its default and one line of help

`run_main` parses the flags into a fresh absl FlagValues (so it can be called again in-process),
runs the entry point, and turns every user mistake into one line on stderr,
`error: <what>: <why>; <how to fix>`, with exit status 2; `--debug` shows the traceback too.
A misspelt key gets the nearest real one as a suggestion. Single keys of the rope-scaling dict
can be set one by one (`--config.student.rope_scaling.original_max_position_embeddings=8192`),
whole dicts as JSON (`--config.student.rope_scaling='{"rope_type": "yarn", "factor": 4.0}'`).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import sys
import traceback
from collections.abc import Callable

from lard_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
# ConfigDicts that are values (printed and overridden as one JSON dict), not sections of keys.
DICT_KEYS = ("student.rope_scaling",)
_ROPE_PREFIX = "--config.student.rope_scaling."
_HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def _line(message: str) -> str:
    return " ".join(str(message).split())  # one line, whatever the exception text held


# ----------------------------------------------------------------------------------------------
# config files and their help text
def load_config_file(path: str):
    """get_config() of a config file (what --config=path loads), without flags."""
    file, _, arg = path.partition(":") if not os.path.exists(path) else (path, "", "")
    if not os.path.isfile(file):
        raise UserError(f"--config={path}: file not found; pass a config file such as configs/demo.py")
    spec = importlib.util.spec_from_file_location("_lard_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


_ASSIGN = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
_CONTINUED = re.compile(r"^\s*#\s{2,}(.*)$")  # a comment line aligned under the previous key's comment


def help_texts(*files: str) -> dict[str, str]:
    """dotted key -> help ("" if none) in the order first assigned, from the trailing comments of
    `c.key = value  # help` lines (a later file's comment wins).

    A comment line right under such a line, indented past the `#`, continues its help."""
    out: dict[str, str] = {}
    for file in files:
        if not file or not os.path.isfile(file):
            continue
        last = None
        with open(file, encoding="utf-8") as f:
            for line in f:
                m = _ASSIGN.match(line)
                if m:
                    last = m.group(1)
                    if m.group(3) or last not in out:
                        out[last] = (m.group(3) or "").strip()
                    continue
                m = _CONTINUED.match(line)
                if m and last in out and out[last]:
                    out[last] += " " + m.group(1).strip()
                else:
                    last = None
    return out


def flat_keys(config, prefix: str = "") -> dict:
    """dotted key -> value; sections recurse, DICT_KEYS stay one value."""
    out = {}
    for key in list(config.keys()):
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and path not in DICT_KEYS:
            out.update(flat_keys(value, path + "."))
        else:
            out[path] = value
    return out


def _show(value) -> str:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return "'" + json.dumps(value) + "'"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def format_help(prog: str, config_path: str, config, *, about: str = "") -> str:
    helps = help_texts(BASE_CONFIG, config_path)
    order = {k: i for i, k in enumerate(helps)}  # file order: base.py first, then the config's own keys
    keys = flat_keys(config)
    keys = dict(
        sorted(
            keys.items(),
            key=lambda kv: (
                order.get(kv[0].split(".")[0], len(order)) if "." in kv[0] else -1,
                order.get(kv[0], len(order)),
            ),
        )
    )
    width = min(48, max(len(f"--config.{k}={_show(v)}") for k, v in keys.items()) + 2)
    lines = [f"usage: python -m {prog} --config=CONFIG.py [--config.KEY=VALUE ...] [--debug]", ""]
    if about:
        lines += [about.strip(), ""]
    lines += [f"Config keys with their defaults from {os.path.relpath(config_path, ROOT)}:"]
    section = None
    for key, value in keys.items():
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            if top:
                lines.append(f"\n  [{top}]" + (f"  {helps[top]}" if helps.get(top) else ""))
        flag = f"--config.{key}={_show(value)}"
        text = helps.get(key, "")
        lines.append(f"  {flag:<{width}} {text}" if len(flag) < width else f"  {flag}\n  {'':<{width}} {text}")
    lines += [
        "",
        'Whole dicts are JSON: --config.student.rope_scaling=\'{"rope_type": "yarn", "factor": 4.0}\';',
        "single keys of it work too: --config.student.rope_scaling.original_max_position_embeddings=4096.",
        'Tuples: --config.loss.relations=\'("q","k")\'.  --debug: show the traceback of an error.',
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# parsing
def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _suggest(bad_flag: str, config_path: str | None) -> str:
    """'; did you mean --config.train.steps?' for a misspelt --config.* key (or a flag)."""
    names = ["--debug", "--config", "--help"]
    if config_path:
        try:
            keys = flat_keys(load_config_file(config_path))
            names += [f"--config.{k}" for k in keys]
        except Exception:  # noqa: BLE001 -- the suggestion is a courtesy; the error comes anyway
            pass
    close = difflib.get_close_matches(bad_flag, names, n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def _unknown_config_key(error: BaseException, argv: list[str]) -> str | None:
    """The --config.* argument that an override error is about: the one holding the missing key."""
    m = re.search(r"[A-Za-z_]\w*", str(error))  # ml_collections puts the missing key first
    if m is None:
        return None
    for arg in argv:
        if arg.startswith("--config."):
            name = _flag_name(arg)
            if m.group(0) in name[len("--config.") :].split("."):
                return name
    return None


def parse(argv: list[str], *, config_required_hint: str):
    """argv -> (config, debug). Raises UserError for anything wrong on the command line."""
    from absl import flags
    from ml_collections import config_flags

    rope_args = [a for a in argv[1:] if a.startswith(_ROPE_PREFIX) and "=" in a]
    rest = [a for a in argv if a not in rope_args]
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file", lock_config=True, flag_values=fv, sys_argv=rest
    )
    flags.DEFINE_bool("debug", False, "show the traceback of an error", flag_values=fv)
    config_path = _config_arg(argv)
    if config_path is not None and not os.path.isfile(config_path) and not os.path.isfile(config_path.split(":")[0]):
        raise UserError(
            f"--config={config_path}: file not found; pass a config file such as configs/demo.py "
            "(paths are relative to the current directory)"
        )
    try:
        extra = fv(rest)
    except flags.UnrecognizedFlagError as e:
        name = "--" + e.flagname if getattr(e, "flagname", None) else _line(e)
        raise UserError(
            f"{name}: unknown flag; {_suggest(name, config_path)}"
            f"`python -m {_prog(argv)} --help` lists every flag and config key"
        ) from None
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key that does not exist
        name = _unknown_config_key(e, argv) or "--config.?"
        raise UserError(
            f"{name}: no such config key; {_suggest(name, config_path)}`python -m {_prog(argv)} --help` lists every key"
        ) from None
    except flags.Error as e:
        raise UserError(
            f"command line: {_line(e)}; `python -m {_prog(argv)} --help` lists every key and its type"
        ) from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a config file that fails to load, a value that does not parse
        raise UserError(
            f"command line: {_line(f'{type(e).__name__}: {e}')}; check --config and the --config.* values"
        ) from None
    if len(extra) > 1:
        raise UserError(f"command line: unexpected argument(s) {extra[1:]}; flags take the form --name=value")
    config = config_flag.value
    if config is None:
        raise UserError(f"--config is not set: {config_required_hint}")
    if rope_args:
        rope = config.student.rope_scaling
        if rope is None:
            raise UserError(
                "--config.student.rope_scaling.*: the config's rope_scaling is None; give the whole "
                'dict as JSON: --config.student.rope_scaling=\'{"rope_type": "linear", "factor": 4.0}\''
            )
        with rope.unlocked():
            for arg in rope_args:
                key, value = arg[len(_ROPE_PREFIX) :].split("=", 1)
                value = _parse_value(value)
                if key in rope and isinstance(rope[key], float) and isinstance(value, int):
                    value = float(value)
                if key in rope:
                    del rope[key]  # a fresh field takes the new value's type
                rope[key] = value
    return config, fv.debug


def _prog(argv) -> str:
    prog = os.path.basename(argv[0]) if argv else "experiments.restore"
    return f"experiments.{prog[:-3]}" if prog.endswith(".py") else prog


def run_main(
    argv: list[str], run: Callable, *, prog: str, default_config: str, about: str = "", config_required_hint: str = ""
) -> int:
    """Parse, run, report. Returns the exit status (0, or 2 for a user error)."""
    argv = list(argv) if argv else [prog]
    argv[0] = prog
    if any(a in _HELP_FLAGS for a in argv[1:]):
        config_path = _config_arg(argv) or default_config
        try:
            config = load_config_file(config_path)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            print(format_help(prog, config_path.split(":")[0], config, about=about))
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`
            sys.stdout = None
        return 0
    debug = "--debug" in argv or "--debug=true" in (a.lower() for a in argv)
    try:
        config, debug = parse(
            argv,
            config_required_hint=config_required_hint
            or f"pass --config={os.path.relpath(default_config, ROOT)} (or your own config file)",
        )
        _quiet_logging()
        run(config)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2; a preempted run (lard_jax.preemption): 128 + the signal
    except OSError as e:  # the filesystem refused something the checks could not foresee (disk full, ...)
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(
            f"error: {where}{e.strerror or _line(e)}; check the path, its permissions and free space "
            "(--debug shows where it happened)",
            file=sys.stderr,
        )
        return 2
    return 0


def _quiet_logging() -> None:
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():  # we parse our own FlagValues; absl logging only wants to know it may log
        flags.FLAGS.mark_as_parsed()
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO


def warn(message: str) -> None:
    """A one-line warning on stderr (`warning: ...`), for things that run but deserve a look."""
    print(f"warning: {_line(message)}", file=sys.stderr)
