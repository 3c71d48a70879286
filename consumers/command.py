"""``horde worker``: serve image models from the horde's queues on this machine's GPU (or CPU).

``configure`` adds the flags to the ``worker`` sub-command's parser; ``run`` starts the worker and
returns the exit code. Mistakes a volunteer can make (a wrong folder, an unknown model, RabbitMQ
down) end with one clear line, not a traceback. Heavy libraries (torch, diffusers) are imported
only once the arguments are known to be good, so ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import BrokerError
from broker.topology import WORKER_NAME_RE
from config import ModelKind, Settings, load_model_reference
from consumers.errors import ConsumerError

if TYPE_CHECKING:
    from consumers.worker import Worker

log = logging.getLogger(__name__)

DEMO_MODEL = "tiny-sd"

DESCRIPTION = """\
Run a volunteer worker: take image jobs for the models you serve from RabbitMQ, generate them
here, and return the results. Each model is a diffusers folder of safetensors weights, named
after the model in the horde's model reference. The worker claims each job before generating,
so several workers can safely serve the same model. Ctrl-C (or SIGTERM) finishes the job in
hand and exits.
"""

EPILOG = """\
examples:
  horde worker --name my-gpu --model stable_diffusion --models-dir ~/models
      serves ~/models/stable_diffusion (a diffusers folder)
  horde worker --name demo --demo
      builds and serves the tiny random-weights demo model (tiny-sd), no download needed
"""


class UsageError(Exception):
    """A mistake in the command line or its folders, reported as one line."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``horde worker`` flags to ``parser``."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--name", required=True, type=_worker_name,
                        help="this worker's name (its RabbitMQ user): 2-63 of a-z, 0-9 and '-'")
    parser.add_argument("--model", action="append", dest="models", default=[], metavar="NAME",
                        help="a model to serve, loaded from DIR/NAME; repeat for several")
    parser.add_argument("--models-dir", type=Path, metavar="DIR", help="folder holding one folder per model")
    parser.add_argument("--amqp-url", metavar="URL",
                        help="RabbitMQ URL with this worker's credentials (default: HORDE_RABBITMQ_URL)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="where to run the models (default: auto, CUDA then MPS then CPU)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for generation on the CPU (default: all cores but one)")
    parser.add_argument("--demo", action="store_true",
                        help=f"also serve the built-in tiny demo model ({DEMO_MODEL}), building it if missing")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the worker; return 0 after a graceful stop, 1 with one line on stderr on failure."""
    _configure_logging(settings.log_level)
    try:
        models = resolve_models(args, settings)
        return _serve(args, settings, models)
    except (UsageError, ConsumerError, BrokerError) as exc:
        print(f"horde worker: {exc}", file=sys.stderr, flush=True)
        return 1


def resolve_models(args: argparse.Namespace, settings: Settings) -> dict[str, Path]:
    """Model name → folder for every model to serve, each known to the horde and present."""
    models: dict[str, Path] = {}
    for name in args.models:
        if args.models_dir is None:
            raise UsageError(f"--model {name} needs --models-dir DIR (the model is loaded from DIR/{name})")
        models[name] = args.models_dir.expanduser() / name
    if args.demo and DEMO_MODEL not in models:
        models[DEMO_MODEL] = settings.state_dir / "models" / DEMO_MODEL
    if not models:
        raise UsageError("nothing to serve: pass --model NAME --models-dir DIR, or --demo")
    _check_reference(models, settings)
    if args.demo:
        _build_demo_model(models[DEMO_MODEL])
    for name, path in models.items():
        if not path.is_dir():
            raise UsageError(f"model folder {path} does not exist (for model {name!r})")
    return models


def _check_reference(models: dict[str, Path], settings: Settings) -> None:
    reference = load_model_reference(settings.model_reference)
    for name in models:
        spec = reference.get(name)
        if spec is None:
            known = ", ".join(reference.names(ModelKind.image))
            raise UsageError(f"unknown model {name!r}: not in the model reference (image models: {known})")
        if spec.kind is not ModelKind.image:
            raise UsageError(f"{name!r} is a {spec.kind.value} model; this worker serves image models")


def _build_demo_model(path: Path) -> None:
    _quiet_libraries()
    from consumers.tiny import build_tiny_sd

    log.info("demo model %s at %s", DEMO_MODEL, build_tiny_sd(path))


def _serve(args: argparse.Namespace, settings: Settings, models: dict[str, Path]) -> int:
    _quiet_libraries()
    from consumers.pipelines import PipelineCache
    from consumers.worker import Worker

    pipelines = PipelineCache(models, device=args.device)
    _set_cpu_threads(pipelines.device.type, args.threads)
    worker = Worker(amqp_url=args.amqp_url or settings.rabbitmq_url, name=args.name, models=models,
                    claim_timeout=settings.claim_timeout_seconds, pipelines=pipelines)
    asyncio.run(_run_until_signalled(worker))
    return 0


async def _run_until_signalled(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    await worker.run(stop)


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
