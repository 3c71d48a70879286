"""``horde admin …`` and ``horde db …``: tasks an operator runs by hand, on the sync database driver."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime

from sqlalchemy import Engine

from config import Settings
from config.database import make_sync_engine

DEMO_USER = "demo"
DEMO_WORKER = "demo-worker"
DEMO_TEXT_WORKER = "demo-text-worker"


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
    p.add_argument("--provision", action="store_true",
                   help="give it its own least-privilege RabbitMQ user and print its amqp_url (shown once)")
    p.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   help="with --provision: a model it serves (repeat for several)")
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
    p = sub.add_parser("report", help="print balances and recent ledger movements, or a VIEW: entries, summary",
                       epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=20, help="how many recent movements (default 20)")
    _configure_report_views(p)
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

    if args.provision:
        return _provision_worker(args, settings, engine)
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


def _provision_worker(args: argparse.Namespace, settings: Settings, engine: Engine) -> int:
    """A worker with its own RabbitMQ user (as ``POST /api/v2/workers``): the row is committed only
    once the broker user and the worker's queue exist."""
    import asyncio

    import sqlalchemy as sa

    from api.accounts import create_worker, find_user
    from api.provisioning import amqp_username, credentials_url, provision_worker
    from api.tables import workers
    from broker.errors import BrokerError
    from config import load_model_reference

    models = list(dict.fromkeys(args.models or []))
    reference = load_model_reference(settings.model_reference)
    unknown = [m for m in models if m not in reference]
    if not models or unknown or args.amqp_user:
        return _fail("--provision needs --model MODEL (known models only) and no --amqp-user"
                     + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    try:
        user = amqp_username(settings.worker_user_prefix, args.name)
    except ValueError as exc:
        return _fail(str(exc))
    kinds = {reference.get(m).kind.value for m in models}  # type: ignore[union-attr]
    if len(kinds) != 1:
        return _fail("a worker serves image models or text models, not both")
    try:
        with engine.begin() as conn:  # rolled back if the broker fails
            owner = find_user(conn, args.owner)
            if owner is None:
                return _fail(f"no user {args.owner!r}")
            try:
                worker = create_worker(conn, args.name, owner=owner, amqp_user=user)
            except ValueError as exc:
                return _fail(str(exc))
            conn.execute(sa.update(workers).where(workers.c.id == worker.id).values(models=models, kind=kinds.pop()))
            password = asyncio.run(provision_worker(settings, args.name, models))
    except BrokerError as exc:
        return _fail(f"the broker could not provision {user}: {exc}")
    url = credentials_url(settings.worker_amqp_url or settings.rabbitmq_url, user, password)
    print(f"registered worker {worker.name} (id {worker.id}) for {owner.username}, RabbitMQ user {user}\n"
          f"amqp_url: {url}\n(keep it: the password is shown only once)")
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

    if args.report_view:
        return _report_view(args, engine)
    with engine.connect() as conn:
        print(report(conn, account_names=account_names(conn), limit=args.limit))
    return 0


# --- horde admin report entries|summary: the admin API's reports (api.admin), as tables or CSV ----

REPORT_EXAMPLES = """\
examples:
  horde admin report                                       balances, totals, recent movements
  horde admin report entries --account alice#3 --since 2026-11-01
  horde admin report entries --worker my-gpu --kind generation --page 2
  horde admin report summary --group-by model
  horde admin report summary --group-by user --sort earned --top 10 --since 2026-11-01
  horde admin report summary --group-by day --csv > flow.csv
"""


def _time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (2026-11-01, 2026-11-01T12:00Z)") from None


def _configure_report_views(parser: argparse.ArgumentParser) -> None:
    views = parser.add_subparsers(dest="report_view", metavar="VIEW")
    p = views.add_parser("entries", help="ledger movements, newest first, filtered and paged")
    p.add_argument("--account", help="alias#id, id, a unique alias, MINT or BURN")
    p.add_argument("--worker", help="a worker's id or name")
    p.add_argument("--model", help="a model name")
    p.add_argument("--kind", choices=["generation", "uptime", "transfer", "admin", "tax"])
    p.add_argument("--page", type=int, default=1, help="page, from 1 (default 1)")
    p.add_argument("--per-page", type=int, default=50, help="entries per page, up to 1000 (default 50)")
    _time_and_format_options(p)
    p = views.add_parser("summary", help="kudos earned and spent, jobs, megapixelsteps, tokens per group")
    p.add_argument("--group-by", choices=["day", "user", "worker", "model"], default="day", help="(default day)")
    p.add_argument("--sort", choices=["key", "earned", "spent", "jobs", "megapixelsteps", "tokens"], default="key",
                   help="by the group (ascending, the default) or a sum (descending)")
    p.add_argument("--top", type=int, help="keep only the first N groups")
    _time_and_format_options(p)


def _time_and_format_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=_time, help="from this time, inclusive (ISO 8601; UTC unless an offset is given)")
    p.add_argument("--until", type=_time, help="before this time, exclusive (ISO 8601)")
    p.add_argument("--csv", action="store_true", help="print CSV (with a header row) instead of a table")


def _report_view(args: argparse.Namespace, engine: Engine) -> int:
    from api import admin
    from api.errors import HordeError
    from ledger import report

    try:
        with engine.connect() as conn:
            if args.report_view == "entries":
                if not (args.page >= 1 and 1 <= args.per_page <= report.MAX_PER_PAGE):
                    return _fail(f"--page is 1 or more, --per-page 1..{report.MAX_PER_PAGE}")
                where = report.EntryFilter(
                    account_id=admin.resolve_account(conn, args.account) if args.account else None,
                    worker_id=admin.resolve_worker(conn, args.worker) if args.worker else None,
                    model=args.model, kind=args.kind, since=args.since, until=args.until)
                found, records = admin.entry_records(conn, where, args.page, args.per_page)
                fields, title = report.ENTRY_FIELDS, f"Ledger entries, page {args.page} ({args.per_page} per page)"
                more = f"more: add --page {args.page + 1}" if found.has_more else "no more pages"
            else:
                records = admin.summary_records(conn, args.group_by, since=args.since, until=args.until,
                                                sort=args.sort, limit=args.top)
                fields, title = report.SUMMARY_FIELDS, f"Ledger summary by {args.group_by} (kudos)"
                more = f"{len(records)} groups"
    except HordeError as exc:
        return _fail(exc.message)
    if args.csv:
        sys.stdout.write(report.to_csv(fields, records))
        return 0
    hidden = _ENTRY_TABLE_HIDES if args.report_view == "entries" else _SUMMARY_TABLE_HIDES[args.group_by]
    shown = [f for f in fields if f not in hidden]
    if args.report_view == "summary":  # the group column is headed by what it is: day, user, worker, model
        shown = [args.group_by if f == "group" else f for f in shown]
        records = [{args.group_by: r["group"], **r} for r in records]
    print(f"{title}{_period_text(args.since, args.until)}")
    print(report.records_table(shown, records) if records else "  none")
    print(f"  ({more})")
    return 0


# In the CSV; left out of the tables, which must fit a terminal.
_ENTRY_TABLE_HIDES = {"account_id", "worker_id", "key", "megapixelsteps", "tokens"}
_SUMMARY_TABLE_HIDES = {"day": {"id"}, "model": {"id"}, "user": set(), "worker": set()}


def _period_text(since: datetime | None, until: datetime | None) -> str:
    parts = ([f"since {since.isoformat()}"] if since else []) + ([f"until {until.isoformat()}"] if until else [])
    return f", {', '.join(parts)}" if parts else ""


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
    """Register the demo workers that ``horde up`` (and docker compose) runs, image and text;
    idempotent."""
    import sqlalchemy as sa

    from api.accounts import create_user, create_worker, find_user
    from api.tables import workers
    from broker.amqp import amqp_user

    engine = make_sync_engine(settings.resolved_database_url)
    with engine.begin() as conn:
        for name in (DEMO_WORKER, DEMO_TEXT_WORKER):
            if conn.execute(sa.select(workers.c.id).where(workers.c.name == name)).first() is None:
                owner = find_user(conn, DEMO_USER) or create_user(conn, DEMO_USER, pepper=settings.apikey_pepper)[0]
                create_worker(conn, name, owner=owner, amqp_user=amqp_user(settings.rabbitmq_url))
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
