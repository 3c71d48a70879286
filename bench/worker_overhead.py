#!/usr/bin/env python
"""The worker's own overhead around generation, and the idle gap between back-to-back jobs.

Each run: a fresh database and vhost, ``horde api`` (dispatcher, claims and results services) on
a free port, the tiny models (tiny-sd, tiny-gpt2) built into a models folder, and the worker
running **in this process** on the CPU (so its per-job timestamps can be read: ``Worker.timings``).
``--jobs`` jobs of one kind are submitted in one burst, then the worker is started and works
through them back to back. It gets them as a real worker does: it asks the dispatcher
(``ask.<worker>``, direct reply-to) when the device is about to be free, and the answer is a job
already leased to it. For each job, from ``time.perf_counter()`` stamps:

- ``decode``: offer received -> job parsed and its source images decoded;
- ``claim``, ``ack``: always 0 now. An offered job carries its lease (no claim RPC) and was acked
  from its queue by the dispatcher; the ask's round trip happens *before* the offer arrives, so it
  is in no job's steps, only in the ``gap`` when it is not hidden behind the previous generation;
- ``encode``: generation done -> result encoded (WebP, or the text) and the event built;
- ``publish``: event published -> broker confirm;
- ``gap``: end of one job's generation -> start of the next one's: the time the device idles.

A run fails unless every submitted job then reads ``done`` through the API (its result stored).

``decode`` of every job but the first happens while the previous job generates; ``encode`` and
``publish`` run while the next one generates: that is the look-ahead (docs/worker.md). The worker
asks for its next job when the one generating has about a quarter of its expected time left, so
the gap is what is left: whatever of the ask's round trip (dispatcher, grant in PostgreSQL, offer)
the look-ahead did not hide, plus thread hand-offs. ``--no-claim-ahead`` makes it ask only once
the device is free, to see what asking ahead saves.

On a GPU machine: ``--device cuda --size full`` runs the same with Stable Diffusion 1.5's sizes
(``stable_diffusion``, 512x512, 20 steps) and GPT-2 medium's (``gpt2-medium``), random weights
built from configs; ``--database sqlite`` keeps the horde's state in a SQLite file, for a machine
with RabbitMQ but no PostgreSQL (``bench/on_gpu_machine.sh`` brings RabbitMQ along).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

try:
    from bench import _common as c
except ImportError:  # run as a script: bench/ is on the path, the repo is not (yet)
    import _common as c  # type: ignore[no-redef]

import httpx  # noqa: E402

STEPS = ("decode", "claim", "ack", "encode", "publish")
#: What each ``--size`` serves: (image model, text model), and the defaults of its jobs.
MODELS = {"tiny": ("tiny-sd", "tiny-gpt2"), "full": ("stable_diffusion", "gpt2-medium")}
JOB_DEFAULTS = {"tiny": {"side": 64, "steps": 8, "tokens": 16}, "full": {"side": 512, "steps": 20, "tokens": 64}}
#: GPT-2 medium is not in config/models.json; a full-size run adds it to the reference it gives the API.
GPT2_MEDIUM_REFERENCE = {"name": "gpt2-medium", "kind": "text", "baseline": "gpt2", "parameters_b": 0.355}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The worker's overhead per job (decode, encode, publish; claim and ack are 0: jobs come "
                    "leased from the dispatcher) and the device's idle gap between back-to-back jobs, with the "
                    "tiny models on the CPU.",
        epilog="example: python bench/worker_overhead.py --jobs 200 --runs 3 --json /tmp/worker.json",
    )
    p.add_argument("--jobs", type=int, default=200, help="jobs per run and kind (default 200)")
    p.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    p.add_argument("--kinds", default="image,text", help="image, text or both (default image,text)")
    p.add_argument("--size", choices=tuple(MODELS), default="tiny",
                   help="tiny: the tests' tiny models; full: SD 1.5's and GPT-2 medium's sizes, random weights "
                        "(default tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the worker generates (default cpu)")
    p.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql",
                   help="the horde's database: a fresh PostgreSQL one, or a SQLite file (default postgresql)")
    p.add_argument("--side", type=int, help="image: width and height (default 64 tiny, 512 full)")
    p.add_argument("--steps", type=int, help="image: denoising steps (default 8 tiny, 20 full)")
    p.add_argument("--tokens", type=int, help="text: max_length of a job (default 16 tiny, 64 full)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for generation (default 1)")
    p.add_argument("--no-claim-ahead", action="store_true",
                   help="ask for the next job only once the device is free (to see what asking ahead saves)")
    p.add_argument("--models-dir", type=Path,
                   help="build the models here, or reuse those already built here (default: a temporary folder)")
    p.add_argument("--json", help="write all results as JSON to this file")
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not 2 <= args.jobs <= 5000 or not 1 <= args.runs <= 20 or not set(args.kinds) <= {"image", "text"}:
        p.error("keep --jobs in 2..5000, --runs in 1..20, --kinds among image,text")
    for key, default in JOB_DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.image_model, args.text_model = MODELS[args.size]
    return args


def _submit(port: int, kind: str, jobs: int, args: argparse.Namespace) -> list[str]:
    if kind == "image":
        path, body = "/api/v2/generate/async", {
            "prompt": "a lighthouse", "models": [args.image_model],
            "params": {"width": args.side, "height": args.side, "steps": args.steps, "sampler_name": "k_euler", "n": 1}}
    else:
        path, body = "/api/v2/generate/text/async", {
            "prompt": "The lighthouse keeper said", "models": [args.text_model], "params": {"max_length": args.tokens}}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        return [http.post(path, json=body).raise_for_status().json()["id"] for _ in range(jobs)]


async def _work(stack: c.Stack, model: str, jobs: int, models: dict[str, Any], claim_ahead: bool,
                device: str) -> list[Any]:
    from consumers.cache import ModelCache
    from consumers.worker import Worker

    cache = ModelCache({model: models[model]}, device=device, progress=False)
    worker = Worker(amqp_url=stack.rabbitmq_url, name="bench-worker", cache=cache, claim_timeout=10,
                    claim_ahead=claim_ahead)
    await worker.start()
    try:
        deadline = time.monotonic() + 600
        while len(worker.timings) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(worker.timings)} of {jobs} jobs done in 600 s")
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    return list(worker.timings)


def _verify_done(port: int, kind: str, ids: list[str], timeout: float = 60.0) -> None:
    """Every submitted job must read ``done`` (not faulted) through the API: its result was stored."""
    path = "/api/v2/generate/check/{}" if kind == "image" else "/api/v2/generate/text/status/{}"
    waiting = set(ids)
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        while waiting and time.monotonic() < deadline:
            for job_id in list(waiting):
                status = http.get(path.format(job_id)).raise_for_status().json()
                if status["faulted"]:
                    raise RuntimeError(f"job {job_id} faulted")
                if status["done"]:
                    waiting.discard(job_id)
            if waiting:
                time.sleep(0.2)
    if waiting:
        raise RuntimeError(f"{len(waiting)} of {len(ids)} jobs not done after the worker finished")


def _summarise(times: list[Any]) -> dict[str, Any]:
    times = sorted(times, key=lambda t: t.generated_from)
    per_step = {step: [t.overhead()[step] for t in times] for step in STEPS}
    generate = [(t.generated_to - t.generated_from) * 1000 for t in times]
    gaps = [(b.generated_from - a.generated_to) * 1000 for a, b in zip(times, times[1:], strict=False)]
    span = (times[-1].generated_to - times[0].generated_from) * 1000
    own = [sum(t.overhead()[s] for s in STEPS) for t in times]
    stats = {name: {"median": round(c.median(v), 2), "p90": round(c.percentile(v, 90), 2),
                    "max": round(max(v), 2)}
             for name, v in {**per_step, "worker total": own, "gap": gaps, "generate": generate}.items()}
    return {"jobs": len(times), "ms": stats, "idle_share": round(sum(gaps) / span, 4),
            "jobs_per_second": round(len(times) / (span / 1000), 1)}


def run_once(args: argparse.Namespace, kind: str, models_root: Path) -> dict[str, Any]:
    from consumers.sources import find_model

    model = args.image_model if kind == "image" else args.text_model
    baseline = "stable_diffusion_1" if kind == "image" else "gpt2"
    models = {model: find_model(model, kind, models_root, baseline=baseline)}
    stack = c.Stack.create(sqlite=args.database == "sqlite")
    api = None
    try:
        port = c.free_port()
        # No aging or republishing during the run: they would add copies of waiting jobs.
        api = c.start_api(stack, port, aging_seconds=86400, republish_after_seconds=86400,
                          model_reference=models_root / "models.json")
        c.register_workers(stack.database_url, ["bench-worker"], stack.rabbitmq_url)
        ids = _submit(port, kind, args.jobs, args)
        times = asyncio.run(_work(stack, model, args.jobs, models, not args.no_claim_ahead, args.device))
        _verify_done(port, kind, ids)
    finally:
        if api is not None:
            api.stop()
        stack.close()
    return _summarise(times)


def _print(kind: str, number: int, result: dict[str, Any]) -> None:
    ms = result["ms"]
    cells = ", ".join(f"{name} {ms[name]['median']:.2f}" for name in (*STEPS, "worker total", "gap", "generate"))
    print(f"{kind} run {number}: {result['jobs']} jobs, {result['jobs_per_second']} jobs/s, "
          f"device idle {result['idle_share'] * 100:.1f}% | medians ms: {cells} | gap p90 "
          f"{ms['gap']['p90']:.2f} max {ms['gap']['max']:.2f}", flush=True)


def build_models(root: Path, args: argparse.Namespace) -> None:
    """The models the run serves, built from configs with random weights, and a model reference for the API."""
    from consumers.tiny import GPT2_MEDIUM, SD15, build_tiny_gpt2, build_tiny_sd

    started = time.perf_counter()
    full = args.size == "full"
    root.mkdir(parents=True, exist_ok=True)
    if "image" in args.kinds and not (root / args.image_model).exists():
        build_tiny_sd(root / args.image_model, **({"shapes": SD15} if full else {}))
    if "text" in args.kinds and not (root / args.text_model).exists():
        build_tiny_gpt2(root / args.text_model, **({"sizes": GPT2_MEDIUM} if full else {}))
    reference = json.loads((c.REPO / "config" / "models.json").read_text())
    (root / "models.json").write_text(json.dumps([*reference, GPT2_MEDIUM_REFERENCE]))
    print(f"{args.size} models ready in {root} in {time.perf_counter() - started:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    report = c.Report("worker_overhead")
    if args.device == "cuda":
        report.machine["gpu"] = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    c.print_machine(report.machine)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="horde-bench-models-") as tmp:
        root = args.models_dir or Path(tmp)
        build_models(root, args)
        for kind in args.kinds:
            results = []
            for number in range(1, args.runs + 1):
                result = run_once(args, kind, root)
                _print(kind, number, result)
                results.append(result)
                report.runs.append({"kind": kind, "run": number, **result})
            medians = {name: round(c.median(r["ms"][name]["median"] for r in results), 2)
                       for name in results[0]["ms"]}
            summary = {"kind": kind, "median_of_run_medians_ms": medians,
                       "idle_share": round(c.median(r["idle_share"] for r in results), 4)}
            report.summary.append(summary)
            print(f"{kind}: median of run medians (ms): {json.dumps(medians)}; device idle "
                  f"{summary['idle_share'] * 100:.1f}%", flush=True)
    report.save(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
