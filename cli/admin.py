"""``horde admin …`` and ``horde db …``: tasks an operator runs by hand, on the sync database driver."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import Engine

from config import Settings
from config.database import make_sync_engine

DEMO_USER = "demo"
DEMO_WORKER = "demo-worker"


def configure_db(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    sub.add_parser("upgrade", help="create or upgrade the database schema to the latest version")
    sub.add_parser("current", help="print the schema version the database is at")


def run_db(args: argparse.Namespace, settings: Settings) -> int:
    import migrations

    if args.db_command == "upgrade":
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        migrations.upgrade(settings.resolved_database_url)
        print("database schema is up to date")
    else:
        migrations.current(settings.resolved_database_url)
    return 0


def configure_admin(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    p = sub.add_parser("create-user", help="create a user and print its API key (shown only once)")
    p.add_argument("name", help="the user's alias; the username becomes alias#id")
    p = sub.add_parser("create-worker", help="register a worker owned by a user (its earnings go to the owner)")
    p.add_argument("name", help="worker name: a-z, 0-9 and '-'")
    p.add_argument("--owner", required=True, help="the owning user: alias#id, id, or a unique alias")
    p.add_argument("--amqp-user", help="AMQP user the worker logs in as (default: the horde's own broker user)")
    p = sub.add_parser("grant", help="mint kudos to a user (recorded as an admin ledger entry)")
    p.add_argument("name", help="alias#id, id, or a unique alias")
    p.add_argument("kudos", type=float, help="kudos to mint")
    p.add_argument("--reason", default="granted by an admin", help="recorded with the entry")
    p = sub.add_parser("transfer", help="move kudos from one user to another (as the API's /kudos/transfer)")
    p.add_argument("source", help="the paying user: alias#id, id, or a unique alias")
    p.add_argument("target", help="the receiving user")
    p.add_argument("kudos", type=float, help="kudos to move (more than 0)")
    p.add_argument("--key", help="idempotency key: the same key moves the kudos once, however often it is run")
    p = sub.add_parser("role", help="grant (or --revoke) a role: admin, moderator or trusted")
    p.add_argument("name", help="alias#id, id, or a unique alias")
    p.add_argument("role", choices=["admin", "moderator", "trusted"])
    p.add_argument("--revoke", action="store_true", help="take the role away instead")
    p = sub.add_parser("report", help="print balances and recent ledger movements")
    p.add_argument("--limit", type=int, default=20, help="how many recent movements (default 20)")
    sub.add_parser("reconcile", help="check the ledger's invariants; exits 1 on any drift")
    sub.add_parser("demo-worker", help=f"register the demo worker {DEMO_WORKER!r} (owner {DEMO_USER!r}) if missing")


def run_admin(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from ledger.errors import LedgerError

    engine = make_sync_engine(settings.resolved_database_url)
    try:
        return _ADMIN[args.admin_command](args, settings, engine)
    except LedgerError as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        return _fail(f"database {settings.resolved_database_url.split('@')[-1]}: {exc.__class__.__name__}: "
                     f"{str(exc).splitlines()[0]} (is it running, and did you run `horde db upgrade`?)")
    finally:
        engine.dispose()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _create_user(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import create_user

    with engine.begin() as conn:
        account, apikey = create_user(conn, args.name, pepper=settings.apikey_pepper)
    print(f"created {account.username}\napikey: {apikey}\n(keep it: it is stored only as a hash)")
    return 0


def _create_worker(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import create_worker, find_user
    from broker.amqp import amqp_user

    with engine.begin() as conn:
        owner = find_user(conn, args.owner)
        if owner is None:
            return _fail(f"no user {args.owner!r}")
        try:
            worker = create_worker(conn, args.name, owner=owner,
                                   amqp_user=args.amqp_user or amqp_user(settings.rabbitmq_url))
        except ValueError as exc:
            return _fail(str(exc))
    print(f"registered worker {worker.name} (id {worker.id}) for {owner.username}")
    return 0


def _grant(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import find_user
    from config.database import utcnow
    from ledger.book import grant

    with engine.begin() as conn:
        user = find_user(conn, args.name)
        if user is None:
            return _fail(f"no user {args.name!r}")
        grant(conn, user.id, args.kudos, reason=args.reason, now=utcnow())
    print(f"granted {args.kudos:g} kudos to {user.username}")
    return 0


def _transfer(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import find_user
    from config.database import utcnow
    from ledger.book import transfer

    with engine.begin() as conn:
        source, target = find_user(conn, args.source), find_user(conn, args.target)
        if source is None or target is None:
            return _fail(f"no user {args.source if source is None else args.target!r}")
        if source.id == target.id:
            return _fail("a user cannot transfer kudos to themselves")
        if source.anonymous:
            return _fail("the anonymous account cannot transfer kudos")
        moved = transfer(conn, source.id, target.id, args.kudos, key=args.key,
                         memo=f"transfer from {source.username}", now=utcnow())
    print(f"transferred {args.kudos:g} kudos from {source.username} to {target.username}" if moved
          else f"already done: transfer {args.key!r} was applied before")
    return 0


def _role(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import find_user
    from api.roles import format_roles, set_role

    with engine.begin() as conn:
        user = find_user(conn, args.name)
        if user is None:
            return _fail(f"no user {args.name!r}")
        roles = set_role(conn, user.id, args.role, granted=not args.revoke)
    print(f"{user.username} now has roles: {format_roles(roles) or '(none)'}")
    return 0


def _report(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from api.accounts import account_names
    from ledger.report import report

    with engine.connect() as conn:
        print(report(conn, account_names=account_names(conn), limit=args.limit))
    return 0


def _reconcile(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    from ledger.report import reconcile

    with engine.connect() as conn:
        drift = reconcile(conn)
    for line in drift:
        print(f"DRIFT: {line}")
    print("ledger reconciles: balances match entries, and user balances = minted - burned" if not drift
          else f"{len(drift)} problem(s) found")
    return 1 if drift else 0


def ensure_demo_worker(settings: Settings) -> None:
    """Register the demo worker that ``horde up`` (and docker compose) runs; idempotent."""
    import sqlalchemy as sa

    from api.accounts import create_user, create_worker, find_user
    from api.tables import workers
    from broker.amqp import amqp_user

    engine = make_sync_engine(settings.resolved_database_url)
    with engine.begin() as conn:
        if conn.execute(sa.select(workers.c.id).where(workers.c.name == DEMO_WORKER)).first() is None:
            owner = find_user(conn, DEMO_USER) or create_user(conn, DEMO_USER, pepper=settings.apikey_pepper)[0]
            create_worker(conn, DEMO_WORKER, owner=owner, amqp_user=amqp_user(settings.rabbitmq_url))
    engine.dispose()


def _demo_worker(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    ensure_demo_worker(settings)
    print(f"demo worker {DEMO_WORKER} is registered")
    return 0


_ADMIN = {
    "demo-worker": _demo_worker,
    "create-user": _create_user,
    "create-worker": _create_worker,
    "grant": _grant,
    "role": _role,
    "transfer": _transfer,
    "report": _report,
    "reconcile": _reconcile,
}
