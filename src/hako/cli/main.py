"""The ``hako`` command."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from hako.errors import EXIT_RUNTIME, HakoError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Docker exits 125 on bad flags; one line, and where to look.
        self.exit(EXIT_RUNTIME, f"hako: {message} (see `{self.prog} --help`)\n")


# Which module defines each command; only the one asked for is imported (start-up time is
# on the critical path of every `hako run`).
_MODULES = {
    "run": "hako.cli.run",
    "ps": "hako.cli.manage",
    "exec": "hako.cli.manage",
    "kill": "hako.cli.manage",
    "stop": "hako.cli.manage",
    "wait": "hako.cli.manage",
    "pause": "hako.cli.manage",
    "unpause": "hako.cli.manage",
    "inspect": "hako.cli.manage",
    "stats": "hako.cli.stats",
    "rm": "hako.cli.manage",
    "logs": "hako.cli.manage",
    "check": "hako.cli.info",
    "assets": "hako.cli.info",
    "image": "hako.cli.info",
    "images": "hako.cli.info",
    "template": "hako.cli.template",
    "pool": "hako.cli.pool",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="hako", description="Secure containers, each in its own micro-VM.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    words = sys.argv[1:] if argv is None else argv
    wanted = next((w for w in words if not w.startswith("-")), None)
    modules = [_MODULES[wanted]] if wanted in _MODULES else sorted(set(_MODULES.values()))
    for name in dict.fromkeys(modules):
        importlib.import_module(name).add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["assets"]:  # a command line of its own (also `python -m hako.assets`)
        from hako.assets.__main__ import main as assets_main

        sys.exit(assets_main(words[1:]))
    try:
        args = build_parser(argv).parse_args(argv)  # (imports the command's modules: Ctrl-C may come)
        code = args.func(args)
    except HakoError as exc:
        print(f"hako: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        code = 128 + getattr(exc, "signum", 2)  # Ctrl-C: SIGINT (2), as a shell reports it
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
