"""The AI Horde compatibility surface: users, kudos, workers and the HTTP worker bridge, and the
OpenAPI document as this server really answers.

The document is FastAPI's, corrected in two ways: validation failures are answered 400 with
``{"message", "rc", "errors"}`` (AI Horde's way), never FastAPI's 422; and every operation
documents that any other error (404, 405, 500, 503...) is the same JSON error body. It is served at
``/openapi.json`` and, as AI Horde serves its own, at ``/api/swagger.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from api import http_workers, kudos, users, workers
from api.schemas import ErrorBody

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ERROR_RESPONSE = {"description": "An error: JSON {message, rc}",
                   "content": {"application/json": {"schema": _ERROR_REF}}}


def install(app: FastAPI) -> None:
    """Add the compatibility routers, the corrected OpenAPI document and its AI Horde address."""
    for router in (users.router, kudos.router, workers.router, http_workers.router):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = horde_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def swagger(_: Request) -> JSONResponse:
        return JSONResponse(app.openapi())

    app.add_route("/api/swagger.json", swagger, methods=["GET"], include_in_schema=False)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"message": "The database is unavailable. Retry shortly.", "rc": "DatabaseUnavailable"},
                            status_code=503)


def horde_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _link(doc, ("/api/v2/generate/async", "post", "202"), {
        "check": ("check_api_v2_generate_check__request_id__get", "request_id"),
        "status": ("status_api_v2_generate_status__request_id__get", "request_id"),
        "cancel": ("cancel_api_v2_generate_status__request_id__delete", "request_id"),
    })
    _example(doc, ("/api/v2/generate/async", "post"), {
        "prompt": "a lighthouse at dusk ### fog", "params": {"width": 64, "height": 64, "steps": 4, "n": 1}})
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            validated = responses.pop("422", None) is not None
            if validated or operation.get("parameters") or operation.get("requestBody"):
                responses.setdefault("400", {"description": "Invalid request", **_content()})
            responses.setdefault("default", _ERROR_RESPONSE)
    return doc


def _content() -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ERROR_REF}}}


def _link(doc: dict[str, Any], where: tuple[str, str, str], links: dict[str, tuple[str, str]]) -> None:
    """OpenAPI links: the id an operation answers is the path parameter of the next (for fuzzers and tools)."""
    path, method, status = where
    response = doc.get("paths", {}).get(path, {}).get(method, {}).get("responses", {}).get(status)
    if response is None:
        return
    response["links"] = {name: {"operationId": operation, "parameters": {parameter: "$response.body#/id"}}
                         for name, (operation, parameter) in links.items()}


def _example(doc: dict[str, Any], where: tuple[str, str], body: dict[str, Any]) -> None:
    path, method = where
    content = (doc.get("paths", {}).get(path, {}).get(method, {}).get("requestBody", {}).get("content", {})
               .get("application/json"))
    if content is not None:
        content["example"] = body
