"""The worker's configuration: a TOML file, overridden by command-line flags.

Example ``worker.toml``::

    name = "my-gpu"
    amqp_url = "amqps://my-gpu:SECRET@horde.example.org/"   # or username/password below
    models_dir = "~/models"
    models = ["stable_diffusion", "SDXL 1.0"]                # or a table: name = "file or folder"
    device = "auto"            # auto | cuda | mps | cpu
    max_pixels = 1048576       # largest width x height this worker takes
    nsfw = false               # false: every image goes through the safety checker
    censorlist = ["word"]      # prompts with these words are checked even when nsfw = true
    safety_checker = "~/models/stable_diffusion"   # default: the first served folder that has one
    max_memory_gb = 20         # models kept loaded at once (LRU); default 90% of free memory

Relative paths are relative to the file (those in a ``models`` table, to ``models_dir``).
Unknown keys are errors, so a typo is never ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumers.errors import ConsumerError


class ConfigError(ConsumerError):
    """The config file cannot be read or says something invalid."""


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    amqp_url: str | None = Field(None, description="RabbitMQ URL with this worker's credentials.")
    username: str | None = Field(None, description="Overrides the user in amqp_url.")
    password: str | None = Field(None, description="Overrides the password in amqp_url.")
    models: list[str] | dict[str, str] = Field(default_factory=list)
    models_dir: Path | None = None
    configs_dir: Path | None = Field(None, description="Single files' diffusers configs; default models_dir/configs.")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    threads: int | None = Field(None, ge=1)
    max_pixels: int = Field(1024 * 1024, ge=64 * 64)
    nsfw: bool = True
    censorlist: list[str] = Field(default_factory=list)
    censor_style: Literal["black", "blur"] = "black"
    safety_checker: Path | None = None
    allow_img2img: bool = True
    allow_painting: bool = True
    allow_pickle: bool = False
    max_memory_gb: float | None = Field(None, gt=0)
    max_length: int = Field(512, ge=1)
    max_context_length: int = Field(8192, ge=1)
    heartbeat_seconds: float = Field(5.0, gt=0)

    def model_paths(self) -> dict[str, Path | None]:
        """Model name -> its explicit file or folder, relative to models_dir (None: found by name)."""
        if isinstance(self.models, list):
            return {name: None for name in self.models}
        base = self.models_dir or Path.cwd()
        return {name: base / Path(path).expanduser() for name, path in self.models.items()}

    def credentials_url(self, default_url: str) -> str:
        """``amqp_url`` (or the horde's) with ``username``/``password`` put in, if given."""
        url = self.amqp_url or default_url
        if self.username is None and self.password is None:
            return url
        parts = urlsplit(url)
        user = quote(self.username if self.username is not None else (parts.username or ""), safe="")
        password = quote(self.password if self.password is not None else (parts.password or ""), safe="")
        host = parts.hostname or ""
        netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_config(path: Path) -> WorkerConfig:
    """Read and check a worker config file; ConfigError with the file and the reason otherwise."""
    try:
        raw = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        config = WorkerConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{path}: {where}: {message}") from exc
    return _relative_to(config, path.expanduser().resolve().parent)


def _relative_to(config: WorkerConfig, base: Path) -> WorkerConfig:
    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (base / p.expanduser())

    updates: dict[str, object] = {
        "models_dir": resolve(config.models_dir), "configs_dir": resolve(config.configs_dir),
        "safety_checker": resolve(config.safety_checker),
    }
    return config.model_copy(update=updates)
