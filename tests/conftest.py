"""Session fixtures: real PostgreSQL, real RabbitMQ, and tiny real models built from configs."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from config import Settings  # noqa: E402
from config.models import DEFAULT_REFERENCE  # noqa: E402
from tests import services  # noqa: E402
from tests.processes import free_port  # noqa: E402

if TYPE_CHECKING:
    from tests.e2e import HordeClient


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with services.migrated_database() as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of the test's own, empty and migrated: PostgreSQL, then SQLite."""
    with services.migrated_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def fresh_engine(fresh_database: str) -> AsyncIterator[Any]:
    """An async engine on ``fresh_database``."""
    from config.database import make_async_engine

    engine = make_async_engine(fresh_database)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    url = services.create_vhost()
    yield url
    services.delete_vhost(url)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


#: Image models only the tests use, so each test has queues of its own; all are the tiny pipeline.
TEST_MODELS = ("tiny-e2e", "tiny-prio", "tiny-kill", "tiny-dup", "tiny-bad", "tiny-cancel", "tiny-purge", "tiny-age",
               "tiny-congest", "tiny-live", "tiny-trusted", "tiny-worker", "tiny-sdk", "tiny-sdk-http", "tiny-sigterm", "tiny-i2i", "tiny-lookahead",
               "tiny-acct", "tiny-ownprio", "tiny-acct-pause", "tiny-acct-revoke", "tiny-acct-http", "tiny-hostile", "tiny-hostile-b",
               "tiny-dead", "tiny-vandal", "tiny-kills", "tiny-hung", "tiny-ledger-kill", "tiny-faulty",
               "tiny-metrics", "tiny-logs", "tiny-limits",
               "tiny-wd-prefetch", "tiny-wd-excl", "tiny-wd-reject", "tiny-wd-purge", "tiny-wd-honest",
               "tiny-wd-decline", "tiny-wd-hold", "tiny-waiting", "tiny-door", "tiny-door-paused", "tiny-door-busy",
               "tiny-late", "tiny-late-taken", "tiny-linger",
               "tiny-amount")
#: Image models whose safety checker flags every image (the tiny pipeline built with flag_everything).
FLAGGING_TEST_MODELS = ("tiny-nsfw", "tiny-censorlist")
#: Text models only the tests use; all are the tiny GPT-2 (consumers.tiny.build_tiny_gpt2).
TEXT_TEST_MODELS = ("tiny-text-e2e", "tiny-text-n", "tiny-text-bad", "tiny-text-sigterm", "tiny-text-sdk",
                    "tiny-text-sdk-http", "tiny-text-kind", "tiny-text-limits")


@pytest.fixture(scope="session")
def model_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    specs = json.loads(DEFAULT_REFERENCE.read_text())
    specs += [{"name": name, "kind": "image", "baseline": "stable_diffusion_1"}
              for name in TEST_MODELS + FLAGGING_TEST_MODELS]
    # Priced as 13B models, so that text prices are above the 0.1 floor and the formula shows.
    specs += [{"name": name, "kind": "text", "baseline": "gpt2", "parameters_b": 13.0} for name in TEXT_TEST_MODELS]
    path = tmp_path_factory.mktemp("reference") / "models.json"
    path.write_text(json.dumps(specs))
    return path


@pytest.fixture(scope="session")
def settings(database_url: str, rabbitmq_url: str, state_dir: Path, model_reference: Path) -> Settings:
    """Settings for a horde on this session's database and vhost, with short leases for tests."""
    return Settings(
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        state_dir=state_dir,
        model_reference=model_reference,
        api_port=free_port(),
        lease_base_seconds=2.0,
        lease_step_seconds=0.02,
        lease_min_seconds=10.0,
        max_attempts=3,
        reconcile_interval_seconds=0.5,
        republish_after_seconds=3.0,
        aging_seconds=8.0,
        claim_timeout_seconds=5.0,
        # RabbitMQ users are broker-wide, not per vhost: a prefix of this session's own keeps
        # concurrent test sessions from provisioning the same worker user.
        worker_user_prefix=f"t{rabbitmq_url.rsplit('-', 1)[-1][:6]}-",
    )


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny SD pipeline, built from configs as safetensors,
    under its own name and under each test model's name; the same with a safety checker that
    flags everything (``tiny-nsfw-sd``); and the tiny GPT-2 (``tiny-gpt2``) for the text models."""
    from consumers.tiny import build_tiny_gpt2, build_tiny_sd

    root = tmp_path_factory.mktemp("models")
    build_tiny_sd(root / "tiny-sd")
    build_tiny_sd(root / "tiny-nsfw-sd", flag_everything=True)
    build_tiny_gpt2(root / "tiny-gpt2")
    for names, target in ((TEST_MODELS, "tiny-sd"), (FLAGGING_TEST_MODELS, "tiny-nsfw-sd"),
                          (TEXT_TEST_MODELS, "tiny-gpt2")):
        for name in names:
            (root / name).symlink_to(root / target, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def horde(settings: Settings) -> Iterator["HordeClient"]:
    """A running horde for end-to-end tests: ``horde api`` and ``horde ledger`` as real processes.

    Tests start the workers they need (tests.processes.start_worker), each on a model of its own.
    When the session ends the books must balance, whatever the tests did: every balance equals the
    sum of its entries, and the sum of user balances equals minted minus burned.
    """
    from ledger.report import reconcile
    from tests.e2e import HordeClient
    from tests.processes import start_api, start_ledger

    api = start_api(settings)
    ledger = start_ledger(settings)
    client = HordeClient(settings)
    yield client
    with client.engine.connect() as conn:
        drift = reconcile(conn)
    client.close()
    ledger.stop()
    api.stop()
    assert drift == [], drift
    # A crash the horde recovers from (a dispatcher that steps down and is elected again) would
    # pass every test above, slower: the logs must show none.
    for process in (api, ledger):
        assert "Traceback" not in process.log(), f"{process.name} logged a traceback:\n{process.log()[-4000:]}"
