"""``horde ledger``: run the ledger consumer that settles kudos from completion events."""

from __future__ import annotations

import argparse

from config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "It consumes horde.ledger and settles each job.done event exactly once."


def run(args: argparse.Namespace, settings: Settings) -> int:
    from ledger.consumer import run as run_consumer

    return run_consumer(settings)
