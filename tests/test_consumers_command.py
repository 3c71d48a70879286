"""``horde worker``: its flags and the one-line errors a volunteer sees."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from config import Settings
from consumers.command import DEMO_MODEL, UsageError, configure, resolve_models, run


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="horde worker")
    configure(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")


def test_the_name_must_be_a_valid_worker_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("--name", "my-gpu-1").name == "my-gpu-1"
    with pytest.raises(SystemExit):
        parse("--name", "My_GPU")
    assert "not a valid worker name" in capsys.readouterr().err


def test_models_come_from_the_models_dir(models_dir: Path, local_settings: Settings) -> None:
    args = parse("--name", "w1", "--model", "tiny-sd", "--models-dir", str(models_dir))
    assert resolve_models(args, local_settings) == {"tiny-sd": models_dir / "tiny-sd"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--model", "tiny-sd"), "needs --models-dir"),
        ((), "nothing to serve"),
        (("--model", "no-such-model", "--models-dir", "."), "unknown model 'no-such-model'"),
        (("--model", "tiny-gpt2", "--models-dir", "."), "is a text model"),
        (("--model", "stable_diffusion", "--models-dir", "/nonexistent"), "does not exist"),
    ],
)
def test_mistakes_are_reported_in_one_line(argv: tuple[str, ...], message: str, local_settings: Settings) -> None:
    with pytest.raises(UsageError, match=message):
        resolve_models(parse("--name", "w1", *argv), local_settings)


def test_demo_builds_the_tiny_model_in_the_state_dir(local_settings: Settings) -> None:
    models = resolve_models(parse("--name", "w1", "--demo"), local_settings)
    assert models == {DEMO_MODEL: local_settings.state_dir / "models" / DEMO_MODEL}
    assert (models[DEMO_MODEL] / "model_index.json").is_file()


def test_an_unreachable_broker_is_one_line_and_exit_1(models_dir: Path, local_settings: Settings,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--name", "w1", "--model", "tiny-sd", "--models-dir", str(models_dir), "--device", "cpu")
    assert run(args, local_settings) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("horde worker: Cannot reach RabbitMQ") and "\n" not in err and "Traceback" not in err
