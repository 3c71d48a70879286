"""``GET /metrics`` on a real horde: scraped before, during and after a real job, parsed, checked."""

from __future__ import annotations

import math
import re

from config import Settings
from tests.e2e import HordeClient
from tests.processes import start_worker, wait_until

MODEL = "tiny-metrics"
TINY = {"width": 64, "height": 64, "steps": 4}
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Prometheus text format 0.0.4 -> {(name, labels): value}, {family: type}; fails on a bad line."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no # TYPE line before it"
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples, types


def scrape(horde: HordeClient) -> tuple[Samples, dict[str, str]]:
    response = horde.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), math.nan)


def dispatch_count(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "horde_dispatch_seconds_count")


def test_metrics_move_with_a_real_job(horde: HordeClient, settings: Settings, models_dir) -> None:
    # The queue depths appear with the reconciler's first tick after start-up.
    wait_until(lambda: value(scrape(horde)[0], "horde_queue_messages", model=MODEL) == 0, 15, "queue depths")
    before, types = scrape(horde)
    assert types["horde_jobs"] == "gauge" and types["horde_dispatch_seconds"] == "histogram"
    done_before = value(before, "horde_jobs", state="done")
    dispatched_before = dispatch_count(before)

    request_id = horde.submit(None, prompt="a metered lighthouse", models=[MODEL], params=TINY)
    # Queued and not yet served: the broker's queue depth (as of the reconciler's next tick) shows it.
    wait_until(lambda: value(scrape(horde)[0], "horde_queue_messages", model=MODEL) == 1, 15,
               "the queue depth to show the job")
    assert value(scrape(horde)[0], "horde_jobs", state="queued") >= 1

    owner = horde.user("metrics-owner")
    horde.register_worker("w-metrics", owner)
    worker = start_worker(settings, "w-metrics", [MODEL], models_dir)
    try:
        horde.wait_done(request_id)
        [job] = horde.job_rows(request_id)
        horde.wait_balance(owner, job.price / 100)  # settled by the ledger
        after = wait_until(lambda: _settled_scrape(horde), 15, "the metrics to show the settled job")
        assert isinstance(after, dict)
        wait_until(lambda: value(scrape(horde)[0], "horde_workers_online", kind="image") >= 1, 30,
                   "the worker to count as online")
    finally:
        worker.stop()

    # >=: other tests of the session may finish jobs meanwhile; this one's is among them.
    assert value(after, "horde_jobs", state="done") >= done_before + 1
    assert value(after, "horde_queue_messages", model=MODEL) == 0
    assert dispatch_count(after) >= dispatched_before + 1
    # The grant came after the publish, within the test's time: in a finite bucket, well under a minute.
    pid_labels = {labels for (name, labels), _ in after.items() if name == "horde_dispatch_seconds_count"}
    [labels] = pid_labels  # one API process in the tests
    buckets = sorted((float(dict(lbl)["le"]), v) for (name, lbl), v in after.items()
                     if name == "horde_dispatch_seconds_bucket")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "histogram buckets must be cumulative"
    assert buckets[-1] == (math.inf, dispatch_count(after))
    assert value(after, "horde_dispatch_seconds_bucket", **dict(labels), le="60") >= dispatched_before + 1
    assert 0 < value(after, "horde_dispatch_seconds_sum", **dict(labels)) < 60 * dispatch_count(after)
    lag = value(after, "horde_settlement_lag_seconds", quantile="1")
    assert 0 <= lag < 30
    assert value(after, "horde_settlement_sampled_jobs") >= 1
    assert value(after, "horde_settlement_pending_jobs") >= 0


def _settled_scrape(horde: HordeClient) -> Samples | None:
    samples, _ = scrape(horde)
    settled = value(samples, "horde_settlement_sampled_jobs") >= 1
    return samples if settled and value(samples, "horde_queue_messages", model=MODEL) == 0 else None


def test_parse_rejects_malformed_exposition() -> None:
    """The parser the test relies on does fail on what Prometheus would refuse."""
    samples, _ = parse('# TYPE a gauge\na{x="1"} 2\n')
    assert value(samples, "a", x="1") == 2
    for bad in ("a 1\n", '# TYPE a gauge\na{x="1"}\n'):
        try:
            parse(bad)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {bad!r}")
