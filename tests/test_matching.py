"""The dispatcher's rules, pure: which job fits which worker (broker.fit), and who gets what (api.matching)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.matching import Ask, Held, at_the_door, plan
from broker.fit import first_fit, refusal
from broker.messages import Capabilities, ImageParams, JobMessage, ModelOffer, TextParams

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _image(job_id: str, *, model: str = "sd", tier: int = 1, age: int = 0, width: int = 512, prompt: str = "a cat",
           nsfw: bool = True, source: str = "txt2img") -> JobMessage:
    return JobMessage(
        job_id=job_id, request_id="r", kind="image", models=[model], prompt=prompt, tier=tier, nsfw=nsfw,
        created_at=T0 - timedelta(seconds=age), source_processing=source,
        source_image=b"png" if source != "txt2img" else None,
        params=ImageParams(width=width, height=512, steps=20, cfg_scale=7, sampler_name="k_euler", karras=True))


def _caps(*models: str, kind: str = "image", **policy: object) -> Capabilities:
    return Capabilities(models=[ModelOffer(name=m, kind=kind) for m in models], **policy)  # type: ignore[arg-type]


def _ask(worker: str, caps: Capabilities, since: float) -> Ask:
    return Ask(worker=worker, capabilities=caps, since=since, refreshed=since, reply_to="rt", correlation_id="c")


def test_refusal_names_each_limit() -> None:
    sd = ModelOffer(name="sd", kind="image")
    assert refusal(_image("a"), sd, _caps("sd")) is None
    assert "not requested" in str(refusal(_image("a", model="other"), sd, _caps("sd")))
    assert "max_pixels" in str(refusal(_image("a", width=2048), sd, _caps("sd", max_pixels=512 * 512)))
    assert "img2img" in str(refusal(_image("a", source="img2img"), sd, _caps("sd", allow_img2img=False)))
    # A job that must be censored needs a safety checker: an SFW request, or a censorlist word.
    assert "safety checker" in str(refusal(_image("a", nsfw=False), sd, _caps("sd")))
    assert refusal(_image("a", nsfw=False), sd, _caps("sd", can_censor=True)) is None
    assert "safety checker" in str(refusal(_image("a", prompt="a Dragon"), sd, _caps("sd", censorlist=["dragon"])))
    assert refusal(_image("a", prompt="dragonfly"), sd, _caps("sd", censorlist=["dragon"])) is None
    text = JobMessage(job_id="t", request_id="r", kind="text", models=["llm"], prompt="hi", tier=1, created_at=T0,
                      params=TextParams(max_length=600))
    llm = ModelOffer(name="llm", kind="text")
    assert "max_length" in str(refusal(text, llm, _caps("llm", kind="text", max_length=512)))
    assert "a text job for image model" in str(refusal(text.model_copy(update={"models": []}), sd, _caps("sd")))
    assert first_fit(_image("a"), "sd", _caps("other")) is None


def test_the_best_job_goes_to_the_worker_waiting_longest() -> None:
    early, late = _ask("early", _caps("sd"), since=1.0), _ask("late", _caps("sd"), since=2.0)
    low, high_young, high_old = (Held("sd", _image("low", tier=1, age=100), 0), Held("sd", _image("hy", tier=3), 1),
                                 Held("sd", _image("ho", tier=3, age=5), 2))
    pairs = plan([late, early], [low, high_young, high_old])
    assert [(a.worker, h.job.job_id) for a, h in pairs] == [("early", "ho"), ("late", "hy")]


def test_an_ask_for_several_takes_the_best_jobs_it_fits_up_to_its_amount() -> None:
    batch = Ask(worker="batch", capabilities=_caps("sd"), since=1.0, refreshed=1.0, reply_to="rt",
                correlation_id="c", amount=3)
    late = _ask("late", _caps("sd"), since=2.0)
    jobs = [Held("sd", _image(f"j{i}", tier=i % 3, age=i), i) for i in range(6)]
    # Best first: tiers 2 (j5, j2), then 1 (j4, j1), then 0 (j3, j0); ages break the ties.
    pairs = plan([late, batch], jobs)
    assert [(a.worker, h.job.job_id) for a, h in pairs] == [("batch", "j5"), ("batch", "j2"), ("batch", "j4"),
                                                             ("late", "j1")]
    # A job queued for two models (a copy in each queue) is still given once a round.
    both = [Held("sd", _image("x"), 0), Held("sd", _image("x"), 1)]
    assert [h.job.job_id for _, h in plan([batch], both)] == ["x"]


def test_a_job_goes_only_to_a_worker_it_fits_and_waits_otherwise() -> None:
    small = _ask("small", _caps("sd", max_pixels=256 * 512), since=1.0)
    big = _ask("big", _caps("sd"), since=2.0)
    other = _ask("other", _caps("flux"), since=0.5)
    large = Held("sd", _image("large", width=1024, tier=4), 0)
    tiny = Held("sd", _image("tiny", width=256, tier=0), 1)
    pairs = plan([small, big, other], [large, tiny])
    # The large job skips the small worker that waited longer; the small one still gets the tiny job.
    assert {(a.worker, h.job.job_id) for a, h in pairs} == {("big", "large"), ("small", "tiny")}
    assert plan([small], [large]) == []  # nobody fits: it stays held


def test_one_job_per_worker_per_round() -> None:
    ask = _ask("w", _caps("sd", "flux"), since=1.0)
    pairs = plan([ask], [Held("sd", _image("a"), 0), Held("flux", _image("b", model="flux"), 1)])
    assert len(pairs) == 1


def test_a_trusted_workers_only_job_goes_only_to_a_trusted_worker() -> None:
    careful = Held("sd", _image("careful", tier=4).model_copy(update={"trusted_workers": True}), 0)
    ordinary = Held("sd", _image("ordinary", tier=0), 1)
    stranger = _ask("stranger", _caps("sd"), since=1.0)
    trusted = _ask("trusted", _caps("sd"), since=2.0)
    trusted.trusted = True
    assert [(a.worker, h.job.job_id) for a, h in plan([stranger], [careful, ordinary])] == [("stranger", "ordinary")]
    assert {(a.worker, h.job.job_id) for a, h in plan([stranger, trusted], [careful, ordinary])} == {
        ("trusted", "careful"), ("stranger", "ordinary")}


def test_copies_of_one_job_in_two_queues_go_to_one_worker_a_round() -> None:
    both = _image("both").model_copy(update={"models": ["sd", "flux"]})
    sd, flux = _ask("sd-worker", _caps("sd"), since=1.0), _ask("flux-worker", _caps("flux"), since=2.0)
    pairs = plan([sd, flux], [Held("sd", both, 0), Held("flux", both, 1), Held("flux", _image("f", model="flux"), 2)])
    # One lease per job per round: the flux worker gets the other job, not the second copy.
    assert [(a.worker, h.job.job_id) for a, h in pairs] == [("sd-worker", "both"), ("flux-worker", "f")]


def test_at_the_door_an_arriving_job_goes_to_a_waiting_worker_it_fits() -> None:
    ask = _ask("w", _caps("sd", max_pixels=512 * 512), since=1.0)
    large = Held("sd", _image("large", width=1024, tier=4, age=50), 0)  # held, fits nobody waiting
    new = Held("sd", _image("new"), 1)
    assert [(a.worker, h.job.job_id) for a, h in at_the_door([ask], [large], [new], lambda m: True)] == [("w", "new")]
    # Not for a model whose queue may still hold older jobs, nor without a waiting worker it fits.
    assert at_the_door([ask], [large], [new], lambda m: False) == []
    assert at_the_door([], [], [new], lambda m: True) == []
    assert at_the_door([ask], [], [Held("sd", _image("big", width=1024), 2)], lambda m: True) == []


def test_at_the_door_a_held_job_that_fits_goes_first() -> None:
    early, late = _ask("early", _caps("sd"), since=1.0), _ask("late", _caps("sd"), since=2.0)
    older = Held("sd", _image("older", age=5), 0)
    pairs = at_the_door([early, late], [older], [Held("sd", _image("new"), 1)], lambda m: True)
    # The held job takes the longest waiter (in the next round); the arriving one gets the other.
    assert [(a.worker, h.job.job_id) for a, h in pairs] == [("late", "new")]
    assert at_the_door([early], [older], [Held("sd", _image("new"), 1)], lambda m: True) == []
    # A better arriving job (higher tier) goes before an older held one.
    pairs = at_the_door([early], [older], [Held("sd", _image("urgent", tier=3), 1)], lambda m: True)
    assert [(a.worker, h.job.job_id) for a, h in pairs] == [("early", "urgent")]
