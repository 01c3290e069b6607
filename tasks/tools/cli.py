"""The `grace` command: tools around the pipeline that are not DVC stages.

    grace diff A B          compare two versions (revisions, experiments or directories)

Each subcommand lives in its own tasks/tools/ module exposing `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "diff": "tasks.tools.diff",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grace", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        summary = module.__doc__.splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
