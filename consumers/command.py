"""``horde worker``: serve image and text models from the horde's queues on this machine's GPU
(or CPU).

``configure`` adds the flags to the ``worker`` sub-command's parser; ``run`` starts the worker and
returns the exit code. Mistakes a volunteer can make (a wrong folder, an unknown model, a model
too big for the GPU, an unreadable config file, RabbitMQ down) end with one clear line, not a
traceback. Heavy libraries (torch, diffusers) are imported only once the arguments are known to
be good, so ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import BrokerError
from broker.topology import WORKER_NAME_RE
from config import Settings, load_model_reference
from consumers.config import ConfigError, WorkerConfig, load_config
from consumers.errors import ConsumerError

if TYPE_CHECKING:
    from consumers.sources import ModelSource
    from consumers.worker import Worker

log = logging.getLogger(__name__)

#: Pause between attempts while the broker refuses this worker's consume (paused, in maintenance).
CONSUME_RETRY_SECONDS = 30.0

DEMO_MODEL = "tiny-sd"
DEMO_TEXT_MODEL = "tiny-gpt2"

DESCRIPTION = """\
Run a volunteer worker: take image and text jobs for the models you serve from RabbitMQ,
generate them here, and return the results. Models live in a models directory, named after the
horde's model reference: a diffusers folder (DIR/NAME/), a single-file checkpoint
(DIR/NAME.safetensors, with its baseline's configs in DIR/configs/BASELINE/) or, for text, a
transformers folder (DIR/NAME/). Pickled weights (.ckpt, .bin) are refused unless --allow-pickle.
The worker claims each job before generating, so several workers can safely serve the same
model. Settings come from --config FILE (TOML) and the flags below, which override it.
Ctrl-C (or SIGTERM) finishes the job in hand, returns the others, and exits.
"""

EPILOG = """\
examples:
  horde worker --name my-gpu --model stable_diffusion --models-dir ~/models
      serves ~/models/stable_diffusion (a diffusers folder) or ~/models/stable_diffusion.safetensors
  horde worker --config worker.toml --no-nsfw
      everything from worker.toml, but censoring every image
  horde worker --name demo --demo --demo-text
      builds and serves the tiny random-weights demo models (tiny-sd, tiny-gpt2), no download needed

config file keys (TOML): name, amqp_url, username, password, models (a list, or a table name =
"file"), models_dir, configs_dir, device, dtype, threads, max_pixels, nsfw, censorlist,
censor_style, safety_checker, allow_img2img, allow_painting, allow_pickle, max_memory_gb,
max_length, max_context_length, heartbeat_seconds
"""


class UsageError(ConsumerError):
    """A mistake in the command line or its folders, reported as one line."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``horde worker`` flags to ``parser``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--config", type=Path, metavar="FILE", help="a TOML config file (keys below); flags override it")
    add("--name", type=_worker_name, help="this worker's name (its RabbitMQ user): 2-63 of a-z, 0-9 and '-'")
    add("--model", action="append", dest="models", metavar="NAME",
        help="a model to serve, found in the models dir by name; repeat for several (replaces the config's)")
    add("--models-dir", type=Path, metavar="DIR", help="folder holding the models")
    add("--configs-dir", type=Path, metavar="DIR",
        help="diffusers configs for single-file checkpoints, one folder per baseline (default: DIR/configs)")
    add("--amqp-url", metavar="URL", help="RabbitMQ URL with this worker's credentials (default: HORDE_RABBITMQ_URL)")
    add("--device", choices=("auto", "cpu", "cuda", "mps"), help="where to run the models (default: auto, "
        "CUDA then MPS then CPU)")
    add("--dtype", choices=("auto", "fp32", "fp16", "bf16"),
        help="precision (default auto: fp16 images / bf16 text on CUDA, fp32 elsewhere)")
    add("--threads", type=int, metavar="N", help="CPU threads for generation on the CPU (default: all cores but one)")
    add("--max-pixels", type=int, metavar="N", help="largest width x height to take (default 1048576)")
    add("--nsfw", action=argparse.BooleanOptionalAction, default=None,
        help="--no-nsfw censors every image with the safety checker (default: --nsfw, censor on request)")
    add("--censorlist", action="append", metavar="WORD", help="a word that switches the censor on; repeatable")
    add("--censor-style", choices=("black", "blur"), help="how a flagged image is replaced (default black)")
    add("--safety-checker", type=Path, metavar="DIR",
        help="safety checker folder (default: the first served model folder that has one)")
    add("--allow-pickle", action="store_const", const=True, default=None,
        help="load pickled .ckpt/.bin weights (they can run code: only from sources you trust)")
    add("--no-img2img", action="store_const", const=False, dest="allow_img2img", default=None,
        help="leave img2img jobs to other workers")
    add("--no-painting", action="store_const", const=False, dest="allow_painting", default=None,
        help="leave inpainting jobs to other workers")
    add("--max-memory-gb", type=float, metavar="GB",
        help="memory for loaded models; least recently used ones are dropped (default: 90%% of free memory)")
    add("--max-length", type=int, metavar="N", help="text: most new tokens per job to take (default 512)")
    add("--max-context-length", type=int, metavar="N", help="text: largest context to take (default 8192)")
    add("--heartbeat-seconds", type=float, metavar="S", help="seconds between heartbeats (default 5)")
    add("--demo", action="store_true", help=f"also serve the built-in tiny image model ({DEMO_MODEL})")
    add("--demo-text", action="store_true", help=f"also serve the built-in tiny text model ({DEMO_TEXT_MODEL})")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the worker; return 0 after a graceful stop, 1 with one line on stderr on failure."""
    _configure_logging(settings.log_level)
    try:
        config = worker_config(args)
        models = resolve_models(args, settings, config)
        return _serve(config, settings, models)
    except (ConsumerError, BrokerError) as exc:
        print(f"horde worker: {exc}", file=sys.stderr, flush=True)
        return 1


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The config file's settings with the flags given on the command line put over them."""
    config = load_config(args.config) if args.config is not None else WorkerConfig()
    overrides: dict[str, Any] = {
        key: getattr(args, key) for key in WorkerConfig.model_fields
        if key not in ("censorlist",) and getattr(args, key, None) is not None
    }
    if args.censorlist:
        overrides["censorlist"] = [*config.censorlist, *args.censorlist]
    try:
        config = WorkerConfig.model_validate({**config.model_dump(), **overrides})
    except ValueError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
    if config.name is None:
        raise UsageError("a worker name is needed: --name NAME, or name = \"…\" in the config file")
    if not WORKER_NAME_RE.match(config.name):
        raise UsageError(f"{config.name!r} is not a valid worker name: use 2-63 characters of a-z, 0-9 and '-'")
    return config


def resolve_models(args: argparse.Namespace, settings: Settings, config: WorkerConfig | None = None
                   ) -> dict[str, ModelSource]:
    """Model name → its files, for every model to serve, each known to the horde and present."""
    from consumers.sources import find_model

    config = config or worker_config(args)
    wanted: dict[str, Path | None] = config.model_paths()
    demo_dir = settings.state_dir / "models"
    if args.demo:
        wanted.setdefault(DEMO_MODEL, demo_dir / DEMO_MODEL)
    if getattr(args, "demo_text", False):
        wanted.setdefault(DEMO_TEXT_MODEL, demo_dir / DEMO_TEXT_MODEL)
    if not wanted:
        raise UsageError("nothing to serve: pass --model NAME --models-dir DIR (or models in --config), or --demo")
    reference = load_model_reference(settings.model_reference)
    for name, explicit in wanted.items():
        if name not in reference:
            known = ", ".join(reference.names())
            raise UsageError(f"unknown model {name!r}: not in the model reference (known: {known})")
        if explicit is None and config.models_dir is None:
            raise UsageError(f"--model {name} needs --models-dir DIR (the model is looked for in DIR)")
    _build_demo_models(wanted, demo_dir)
    sources = {}
    for name, explicit in wanted.items():
        spec = reference.get(name)
        assert spec is not None
        models_dir = config.models_dir.expanduser() if config.models_dir else None
        sources[name] = find_model(name, spec.kind.value, models_dir, baseline=spec.baseline, explicit=explicit,
                                   configs_dir=config.configs_dir, allow_pickle=config.allow_pickle)
    return sources


def _build_demo_models(wanted: dict[str, Path | None], demo_dir: Path) -> None:
    builders = {DEMO_MODEL: "build_tiny_sd", DEMO_TEXT_MODEL: "build_tiny_gpt2"}
    for name, builder in builders.items():
        if wanted.get(name) == demo_dir / name:
            _quiet_libraries()
            from consumers import tiny

            log.info("demo model %s at %s", name, getattr(tiny, builder)(demo_dir / name))


def _serve(config: WorkerConfig, settings: Settings, models: dict[str, ModelSource]) -> int:
    _quiet_libraries()
    from consumers.cache import ModelCache, Policy
    from consumers.devices import GIB
    from consumers.safety import Censorlist
    from consumers.worker import Worker

    policy = Policy(nsfw=config.nsfw, censorlist=Censorlist.of(config.censorlist), censor_style=config.censor_style,
                    max_pixels=config.max_pixels, allow_img2img=config.allow_img2img,
                    allow_painting=config.allow_painting, max_length=config.max_length,
                    max_context_length=config.max_context_length)
    budget = int(config.max_memory_gb * GIB) if config.max_memory_gb else None
    cache = ModelCache(models, device=config.device, dtype=config.dtype, memory_budget=budget, policy=policy,
                       safety_folder=config.safety_checker)
    _set_cpu_threads(cache.device.type, config.threads)
    if policy.censorlist.words:
        log.info("censorlist: %d word(s) switch the safety checker on", len(policy.censorlist.words))
    def new_worker() -> Worker:
        return Worker(amqp_url=config.credentials_url(settings.rabbitmq_url), name=config.name or "",
                      ask_refresh_seconds=settings.ask_refresh_seconds,
                      cache=cache, claim_timeout=settings.claim_timeout_seconds,
                      heartbeat_seconds=config.heartbeat_seconds)

    asyncio.run(_run_until_signalled(new_worker))
    return 0


async def _run_until_signalled(new_worker: Callable[[], Worker]) -> None:
    """Run the worker until a signal; while the broker refuses its consume (a registered worker
    paused or in maintenance may read no queue), say so and try again slowly, never crash-loop."""
    import aiormq

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    while not stop.is_set():
        try:
            await new_worker().run(stop)
            return
        except aiormq.exceptions.ChannelAccessRefused as exc:
            log.warning("RabbitMQ refused to let this worker consume (%s): it is paused, in maintenance or "
                        "deleted, or not registered for these models. Trying again in %gs", exc,
                        CONSUME_RETRY_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CONSUME_RETRY_SECONDS)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("%s received: stopping after the job in hand", sig.name)
    stop.set()


def _worker_name(value: str) -> str:
    if not WORKER_NAME_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid worker name: use 2-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return value


def _set_cpu_threads(device_type: str, threads: int | None) -> None:
    """On the CPU, leave one core to the event loop so AMQP heartbeats and acks stay timely."""
    if device_type != "cpu":
        return
    import torch

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))


def _quiet_libraries() -> None:
    """Offline, quiet Hugging Face libraries; set before they are first imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a worker loads local folders only
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _configure_logging(level: str) -> None:
    # No-op when the horde CLI already configured logging; stderr flushes every record.
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
