"""Client and worker flows run with horde-sdk from PyPI, unmodified, against a running horde.

This file runs in the SDK's own environment (``.venv-sdk``, Python >= 3.12), never in the main
test environment: ``python tests/sdk/flows.py FLOW '{"json": "arguments"}'``. The horde's base
URL comes, as for every SDK user, from ``AI_HORDE_URL`` (``http://127.0.0.1:PORT/api/``).
Each flow prints one line ``RESULT <json>`` with what the SDK returned or raised, for the tests
(tests/test_compat_sdk.py) to check.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPIManualClient, AIHordeAPISimpleClient
from horde_sdk.ai_horde_api.apimodels import (
    AIHordeHeartbeatRequest,
    AIHordeHeartbeatResponse,
    AllWorkersDetailsRequest,
    AllWorkersDetailsResponse,
    DeleteImageGenerateRequest,
    FindUserRequest,
    HordePerformanceRequest,
    HordePerformanceResponse,
    HordeStatusModelsAllRequest,
    HordeStatusModelsAllResponse,
    ImageGenerateAsyncRequest,
    ImageGenerateAsyncResponse,
    ImageGenerateCheckRequest,
    ImageGenerateCheckResponse,
    ImageGenerateJobPopRequest,
    ImageGenerateJobPopResponse,
    ImageGenerateStatusResponse,
    ImageGenerationInputPayload,
    ImageGenerationJobSubmitRequest,
    JobSubmitResponse,
    KudosTransferRequest,
    KudosTransferResponse,
    ListUsersDetailsRequest,
    ListUsersDetailsResponse,
    SingleUserDetailsRequest,
    SingleWorkerDetailsRequest,
    SingleWorkerDetailsResponse,
    TextGenerateAsyncRequest,
    TextGenerateJobPopRequest,
    TextGenerateJobPopResponse,
    TextGenerationJobSubmitRequest,
    UserDetailsResponse,
)
from horde_sdk.ai_horde_api.apimodels.generate.text.async_ import ModelGenerationInputKobold
from horde_sdk.ai_horde_api.consts import GENERATION_STATE
from horde_sdk.ai_horde_api.exceptions import AIHordeRequestError
from horde_sdk.generic_api.apimodels import RequestErrorResponse
from PIL import Image

FLOWS: dict[str, Callable[[dict[str, Any]], Any]] = {}


def flow(function: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    FLOWS[function.__name__] = function
    return function


def manual(request: Any, response_type: type) -> Any:
    """One request with the SDK's manual client; an error answer raises AIHordeRequestError."""
    answer = AIHordeAPIManualClient().submit_request(request, response_type)
    if isinstance(answer, RequestErrorResponse):
        raise AIHordeRequestError(answer)
    return answer


def image_request(args: dict[str, Any], **extra: Any) -> ImageGenerateAsyncRequest:
    return ImageGenerateAsyncRequest(
        apikey=args.get("apikey", "0000000000"), prompt=args.get("prompt", "a lighthouse at dusk"),
        models=[args["model"]],
        params=ImageGenerationInputPayload(width=args.get("width", 64), height=args.get("height", 64),
                                           steps=args.get("steps", 4), n=args.get("n", 1),
                                           **({"seed": args["seed"]} if "seed" in args else {})),
        **extra,
    )


@flow
def heartbeat(args: dict[str, Any]) -> Any:
    answer = AIHordeAPISimpleClient().heartbeat_request()
    also = manual(AIHordeHeartbeatRequest(), AIHordeHeartbeatResponse)
    return {"version": answer.version, "message": answer.message, "again": also.version}


@flow
def models(args: dict[str, Any]) -> Any:
    image = AIHordeAPISimpleClient().image_status_models_all()
    text = manual(HordeStatusModelsAllRequest(type="text"), HordeStatusModelsAllResponse)
    busy = manual(HordeStatusModelsAllRequest(min_count=1), HordeStatusModelsAllResponse)

    def rows(answer: Any) -> list[dict[str, Any]]:
        return [{"name": m.name, "count": m.count, "jobs": m.jobs, "queued": m.queued, "eta": m.eta,
                 "performance": m.performance, "type": str(m.type_) if m.type_ else None} for m in answer]

    return {"image": rows(image), "text": rows(text), "min_count_1": rows(busy)}


@flow
def performance(args: dict[str, Any]) -> Any:
    answer = manual(HordePerformanceRequest(), HordePerformanceResponse)
    return answer.model_dump()


@flow
def dry_run(args: dict[str, Any]) -> Any:
    answer = AIHordeAPISimpleClient().image_generate_request_dry_run(image_request(args, dry_run=True))
    return {"kudos": answer.kudos}


@flow
def image(args: dict[str, Any]) -> Any:
    client = AIHordeAPISimpleClient()
    status, request_id = client.image_generate_request(image_request(args), timeout=args.get("timeout", 120))
    out = []
    for generation in status.generations:
        picture = client.download_image_from_generation(generation)
        out.append({"id": str(generation.id_), "seed": generation.seed, "model": generation.model,
                    "worker_name": generation.worker_name, "worker_id": str(generation.worker_id),
                    "state": str(generation.state), "censored": generation.censored,
                    "size": list(picture.size), "format": picture.format})
    return {"request_id": str(request_id), "done": status.done, "finished": status.finished,
            "kudos": status.kudos, "generations": out}


@flow
def cancel(args: dict[str, Any]) -> Any:
    accepted = manual(image_request(args), ImageGenerateAsyncResponse)
    check = manual(ImageGenerateCheckRequest(id=accepted.id_), ImageGenerateCheckResponse)
    deleted = AIHordeAPIManualClient().delete_pending_image(accepted.id_)
    again = manual(DeleteImageGenerateRequest(id=accepted.id_), ImageGenerateStatusResponse)
    return {"request_id": str(accepted.id_), "kudos": accepted.kudos, "waiting_before": check.waiting,
            "done": deleted.done, "waiting": deleted.waiting, "generations": len(deleted.generations),
            "again_done": again.done}


@flow
def find_user(args: dict[str, Any]) -> Any:
    me = manual(FindUserRequest(apikey=args["apikey"]), UserDetailsResponse)
    public = manual(SingleUserDetailsRequest(user_id=str(me.id_)), UserDetailsResponse)
    board = manual(ListUsersDetailsRequest(page=1, sort="kudos"), ListUsersDetailsResponse)
    return {"id": me.id_, "username": me.username, "kudos": me.kudos, "worker_ids": me.worker_ids,
            "records": me.records.model_dump() if me.records else None,
            "kudos_details": me.kudos_details.model_dump() if me.kudos_details else None,
            "public_username": public.username, "public_worker_ids": public.worker_ids,
            "leaderboard": [u.username for u in board.root]}


@flow
def transfer(args: dict[str, Any]) -> Any:
    answer = manual(KudosTransferRequest(apikey=args["apikey"], username=args["username"], amount=args["amount"]),
                    KudosTransferResponse)
    return {"transferred": answer.transferred}


@flow
def workers(args: dict[str, Any]) -> Any:
    listed = manual(AllWorkersDetailsRequest(), AllWorkersDetailsResponse)
    out = {"workers": [{"id": str(w.id_), "name": w.name, "type": str(w.type_), "online": w.online,
                        "models": w.models, "requests_fulfilled": w.requests_fulfilled} for w in listed]}
    if listed.root:
        one = manual(SingleWorkerDetailsRequest(worker_id=str(listed.root[0].id_)), SingleWorkerDetailsResponse)
        out["single"] = one.name
    return out


@flow
def error(args: dict[str, Any]) -> Any:
    """Run one call that the horde refuses; return what the SDK raised (its message) and the rc."""
    kind = args["case"]
    calls: dict[str, Callable[[], Any]] = {
        "unknown_model": lambda: AIHordeAPISimpleClient().image_generate_request(
            image_request({"model": "no-such-model"}), timeout=30),
        "unknown_request": lambda: manual(ImageGenerateCheckRequest(id="00000000-0000-4000-8000-000000000000"),
                                          ImageGenerateCheckResponse),
        "unknown_user": lambda: manual(SingleUserDetailsRequest(user_id="999999"), UserDetailsResponse),
        "invalid_key": lambda: manual(FindUserRequest(apikey="x" * 22), UserDetailsResponse),
        "transfer_to_self": lambda: manual(
            KudosTransferRequest(apikey=args.get("apikey", ""), username=args.get("username", ""), amount=1),
            KudosTransferResponse),
        "transfer_from_anonymous": lambda: manual(
            KudosTransferRequest(apikey="0000000000", username=args.get("username", ""), amount=1),
            KudosTransferResponse),
        "anonymous_worker": lambda: manual(
            ImageGenerateJobPopRequest(apikey="0000000000", name="anon-worker", models=["x"], max_pixels=4096),
            ImageGenerateJobPopResponse),
    }
    try:
        answer = calls[kind]()
    except AIHordeRequestError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "answer": repr(answer)[:500]}  # the horde accepted what it should refuse


@flow
def text(args: dict[str, Any]) -> Any:
    request = TextGenerateAsyncRequest(
        apikey=args.get("apikey", "0000000000"), prompt=args.get("prompt", "The lighthouse keeper said"),
        models=[args["model"]],
        params=ModelGenerationInputKobold(max_length=args.get("max_length", 16), max_context_length=512))
    status, request_id = AIHordeAPISimpleClient().text_generate_request(request, timeout=args.get("timeout", 120))
    return {"request_id": str(request_id), "done": status.done, "finished": status.finished,
            "generations": [{"text": g.text, "model": g.model, "worker_name": g.worker_name, "state": str(g.state),
                             "seed": g.seed} for g in status.generations]}


@flow
def text_http_worker(args: dict[str, Any]) -> Any:
    """A text worker made of the SDK's own text pop and submit request classes: serve ``jobs`` jobs."""
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.get("timeout", 90)
    while len(done) < args["jobs"] and time.monotonic() < deadline:
        job = manual(TextGenerateJobPopRequest(apikey=args["apikey"], name=args["name"], models=args["models"],
                                               max_length=512, max_context_length=2048,
                                               bridge_agent="horde-sdk test text worker:1:none"),
                     TextGenerateJobPopResponse)
        if job.id_ is None:
            time.sleep(0.3)
            continue
        submitted = manual(TextGenerationJobSubmitRequest(apikey=args["apikey"], id=job.id_,
                                                          generation=args["reply"], state=GENERATION_STATE.ok),
                           JobSubmitResponse)
        done.append({"id": str(job.id_), "model": job.model, "ttl": job.ttl, "prompt": job.payload.prompt,
                     "max_length": job.payload.max_length, "reward": submitted.reward})
    return {"jobs": done}


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 140, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@flow
def http_worker(args: dict[str, Any]) -> Any:
    """An HTTP worker made of the SDK's own pop and submit request classes: serve ``jobs`` jobs."""
    done: list[dict[str, Any]] = []
    empty_pops, deadline = 0, time.monotonic() + args.get("timeout", 90)
    while len(done) < args["jobs"] and time.monotonic() < deadline:
        job = manual(ImageGenerateJobPopRequest(apikey=args["apikey"], name=args["name"], models=args["models"],
                                                max_pixels=args.get("max_pixels", 262144),
                                                bridge_agent="horde-sdk test worker:1:none"),
                     ImageGenerateJobPopResponse)
        if job.id_ is None:
            empty_pops += 1
            time.sleep(0.3)
            continue
        payload = job.payload
        submitted = manual(ImageGenerationJobSubmitRequest(
            apikey=args["apikey"], id=job.id_, generation=_png(payload.width, payload.height),
            state=GENERATION_STATE.ok, seed=int(payload.seed or 0)), JobSubmitResponse)
        done.append({"id": str(job.id_), "ids": [str(i) for i in job.ids], "model": job.model, "ttl": job.ttl,
                     "prompt": payload.prompt, "width": payload.width, "height": payload.height,
                     "steps": payload.ddim_steps, "seed": payload.seed, "reward": submitted.reward,
                     "skipped": job.skipped.model_dump(exclude_unset=True)})
    return {"jobs": done, "empty_pops": empty_pops}


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    result = FLOWS[name](json.loads(raw))
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
