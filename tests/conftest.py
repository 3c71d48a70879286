"""Session fixtures: real PostgreSQL, real RabbitMQ, and tiny real models built from configs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import migrations  # noqa: E402
from config import Settings  # noqa: E402
from tests import services  # noqa: E402


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = services.create_database()
    migrations.upgrade(url)
    yield url
    services.drop_database(url)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    url = services.create_vhost()
    yield url
    services.delete_vhost(url)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def settings(database_url: str, rabbitmq_url: str, state_dir: Path) -> Settings:
    """Settings for a horde on this session's database and vhost, with short leases for tests."""
    return Settings(
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        state_dir=state_dir,
        lease_min_seconds=6.0,
        reconcile_interval_seconds=0.5,
        republish_after_seconds=3.0,
        claim_timeout_seconds=5.0,
    )


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the tiny SD pipeline, built from configs as safetensors."""
    from consumers.tiny import build_tiny_sd

    root = tmp_path_factory.mktemp("models")
    build_tiny_sd(root / "tiny-sd")
    return root
