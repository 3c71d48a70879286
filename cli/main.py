"""The ``horde`` command line. Each subcommand reads the settings once and hands them down.

Rooms are imported only by the subcommand that needs them, so ``horde api`` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from cli.logs import setup_logging
from config import Settings

EPILOG = """\
examples:
  horde up                                  run everything on this machine (needs RabbitMQ on localhost)
  horde admin create-user alice             create a user; prints its API key
  horde admin grant alice#1 1000            mint 1000 kudos to alice#1
  horde worker --name my-gpu --model stable_diffusion --models-dir ~/models
  horde admin report                        balances and recent movements

Settings come from HORDE_* environment variables (or .env): HORDE_RABBITMQ_URL, HORDE_DATABASE_URL,
HORDE_API_PORT, ... See README.md.
"""

# subcommand -> (module, configure, run, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "up": ("cli.up", "configure", "run", "run the API, the ledger and a demo worker on this machine"),
    "api": ("api.command", "configure", "run", "serve the HTTP API and the trusted job services"),
    "ledger": ("ledger.command", "configure", "run", "run the ledger consumer that settles kudos"),
    "worker": ("consumers.command", "configure", "run", "run a GPU worker that generates jobs"),
    "db": ("cli.admin", "configure_db", "run_db", "database schema: upgrade, current"),
    "admin": ("cli.admin", "configure_admin", "run_admin", "users, workers, kudos grants, ledger reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="horde",
        description="The Horde on RabbitMQ: a crowdsourced AI generation network with a kudos economy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, configure, _, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        _load(module, configure)(command_parser)
    return parser


def _load(module: str, attribute: str) -> Callable:  # type: ignore[type-arg]
    return getattr(importlib.import_module(module), attribute)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    setup_logging(settings.log_level, f"horde-{args.command}", settings.log_format)
    module, _, run, _ = COMMANDS[args.command]
    return int(_load(module, run)(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
