"""Alembic environment: the URL comes from `config.attributes["database_url"]` (set by
`app.infra.migrate`) or from the environment through `app.infra.settings`."""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context

import app.jobs.models  # noqa: F401  (each domain's tables, on Base.metadata for autogenerate)
import app.openai.models  # noqa: F401
import app.tenancy.keys  # noqa: F401
import app.webhooks.models  # noqa: F401
from app.infra.db import Base, create_db_engine
from app.infra.settings import Settings

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or Settings.from_env().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(database_url())
    try:
        with engine.connect() as connection:
            # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                              compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
