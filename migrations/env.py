"""Alembic environment: runs the versioned migrations against the configured URL (sync driver)."""

from alembic import context
from sqlalchemy import pool

from config.database import make_sync_engine

config = context.config


def run_migrations_online() -> None:
    engine = make_sync_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
