"""``horde worker``: its flags and the one-line errors a volunteer sees."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from config import Settings
from consumers.command import DEMO_MODEL, DEMO_TEXT_MODEL, configure, resolve_models, run, worker_config
from consumers.config import ConfigError, load_config
from consumers.errors import ConsumerError, ModelLoadError
from consumers.sources import ModelFormat


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
    args = parse("--name", "w1", "--model", "tiny-sd", "--model", "tiny-gpt2", "--models-dir", str(models_dir))
    sources = resolve_models(args, local_settings)
    assert sources["tiny-sd"].path == models_dir / "tiny-sd" and sources["tiny-sd"].kind == "image"
    assert sources["tiny-sd"].format is ModelFormat.diffusers
    assert sources["tiny-gpt2"].kind == "text" and sources["tiny-gpt2"].format is ModelFormat.transformers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--model", "tiny-sd"), "needs --models-dir"),
        ((), "nothing to serve"),
        (("--model", "no-such-model", "--models-dir", "."), "unknown model 'no-such-model'"),
        (("--model", "tiny-gpt2", "--models-dir", "/nonexistent"), "'tiny-gpt2': file not found"),
        (("--model", "stable_diffusion", "--models-dir", "/nonexistent"),
         r"file not found: nothing at /nonexistent/stable_diffusion/ or /nonexistent/stable_diffusion\.safetensors"),
    ],
)
def test_mistakes_are_reported_in_one_line(argv: tuple[str, ...], message: str, local_settings: Settings) -> None:
    with pytest.raises(ConsumerError, match=message):
        resolve_models(parse("--name", "w1", *argv), local_settings)


def test_a_model_of_the_wrong_kind_or_format_is_refused(models_dir: Path, local_settings: Settings,
                                                       tmp_path: Path) -> None:
    (tmp_path / "tiny-gpt2").symlink_to(models_dir / "tiny-sd")
    with pytest.raises(ModelLoadError, match="is a diffusers .image. folder but 'tiny-gpt2' is a text model"):
        resolve_models(parse("--name", "w1", "--model", "tiny-gpt2", "--models-dir", str(tmp_path)), local_settings)
    (tmp_path / "stable_diffusion.ckpt").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickled weights can run arbitrary code"):
        resolve_models(parse("--name", "w1", "--model", "stable_diffusion", "--models-dir", str(tmp_path)),
                       local_settings)
    (tmp_path / "stable_diffusion.ckpt").unlink()
    (tmp_path / "stable_diffusion.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="needs the diffusers configs of its baseline stable_diffusion_1 at "
                                             f"{tmp_path}/configs/stable_diffusion_1"):
        resolve_models(parse("--name", "w1", "--model", "stable_diffusion", "--models-dir", str(tmp_path)),
                       local_settings)


def test_demo_builds_the_tiny_models_in_the_state_dir(local_settings: Settings) -> None:
    models = resolve_models(parse("--name", "w1", "--demo", "--demo-text"), local_settings)
    assert models[DEMO_MODEL].path == local_settings.state_dir / "models" / DEMO_MODEL
    assert (models[DEMO_MODEL].path / "model_index.json").is_file()
    assert models[DEMO_TEXT_MODEL].path == local_settings.state_dir / "models" / DEMO_TEXT_MODEL
    assert models[DEMO_TEXT_MODEL].kind == "text"


def test_a_config_file_with_flags_over_it(tmp_path: Path, models_dir: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f"""
name = "from-file"
amqp_url = "amqp://ignored:pw@broker.example:5671/horde"
username = "gpu-7"
password = "s3cret/+"
models_dir = "{models_dir}"
models = ["tiny-sd"]
max_pixels = 262144
nsfw = false
censorlist = ["Lighthouse"]
safety_checker = "checker"
""")
    loaded = load_config(config)
    assert loaded.safety_checker == tmp_path / "checker"  # relative to the file
    assert loaded.credentials_url("amqp://guest:guest@localhost/") == "amqp://gpu-7:s3cret%2F%2B@broker.example:5671/horde"
    merged = worker_config(parse("--config", str(config), "--name", "from-flag", "--censorlist", "ship",
                                 "--max-pixels", "4096", "--nsfw"))
    assert merged.name == "from-flag" and merged.max_pixels == 4096 and merged.nsfw is True
    assert merged.censorlist == ["Lighthouse", "ship"] and merged.models == ["tiny-sd"]
    assert worker_config(parse("--config", str(config), "--model", "tiny-gpt2")).models == ["tiny-gpt2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read config .*No such file"),
        ("name = ", "invalid TOML"),
        ("nmae = 'x'", "nmae: unknown setting"),
        ("max_pixels = 'big'", "max_pixels: Input should be a valid integer"),
        ("device = 'tpu'", "device: Input should be 'auto', 'cpu', 'cuda' or 'mps'"),
    ],
)
def test_an_unreadable_config_is_one_clear_line(tmp_path: Path, content: str | None, message: str) -> None:
    config = tmp_path / "worker.toml"
    if content is not None:
        config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_the_name_is_needed_somewhere(local_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse("--demo"), local_settings) == 1
    assert "a worker name is needed" in capsys.readouterr().err


def test_an_unreachable_broker_is_one_line_and_exit_1(models_dir: Path, local_settings: Settings,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--name", "w1", "--model", "tiny-sd", "--models-dir", str(models_dir), "--device", "cpu")
    assert run(args, local_settings) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("horde worker: Cannot reach RabbitMQ") and "\n" not in err and "Traceback" not in err
