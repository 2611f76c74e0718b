"""HTTP routes: authenticate, parse, hand over to `OpenAIServing`, return. No logic lives here."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serve import protocol as p
from serve.errors import ModelNotFound, NotReady
from serve.feedback import give_feedback
from serve.gateway import Gateway, gateway_of
from serve.serving import OpenAIServing, parse

router = APIRouter()


def authenticated(request: Request) -> Gateway:
    gateway = gateway_of(request)
    request.state.api_key_label = gateway.keys(request.headers.get("authorization"))
    return gateway


def serving(request: Request) -> Gateway:
    gateway = authenticated(request)
    if gateway.draining:
        raise NotReady("The server is shutting down.")
    if not gateway.ready():
        raise NotReady("The server is still loading its models.")
    return gateway


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _answer(request: Request, serving: OpenAIServing[Any]) -> Response:
    arrived, arrived_at = time.perf_counter(), time.time()
    req = await serving.offload(parse, serving.request_type, await request.body())  # up to ~0.5 s for 1 MiB
    prep = await serving.prepare(req)
    prep.arrived, prep.arrived_at, prep.api_key_label = arrived, arrived_at, request.state.api_key_label
    if prep.stream:
        return StreamingResponse(serving.stream(prep, req.model), media_type="text/event-stream", headers=SSE_HEADERS)
    body = await serving.complete(prep, req.model, request.is_disconnected)
    return JSONResponse(body.model_dump())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, gateway: Annotated[Gateway, Depends(serving)]) -> Response:
    return await _answer(request, gateway.chat)


@router.post("/v1/completions")
async def completions(request: Request, gateway: Annotated[Gateway, Depends(serving)]) -> Response:
    return await _answer(request, gateway.completion)


@router.post("/v1/feedback")
async def feedback(request: Request, gateway: Annotated[Gateway, Depends(authenticated)]) -> p.FeedbackReceipt:
    req = await asyncio.to_thread(parse, p.FeedbackRequest, await request.body())
    return await give_feedback(gateway.capture, req, request.state.api_key_label)


@router.get("/v1/models")
async def models(gateway: Annotated[Gateway, Depends(authenticated)]) -> p.ModelList:
    rows = await asyncio.to_thread(gateway.directory.listing)
    return p.ModelList(data=[p.ModelCard(id=i, created=c, parent=parent, root=parent) for i, parent, c in rows])


@router.get("/v1/models/{model:path}")
async def model(model: str, gateway: Annotated[Gateway, Depends(authenticated)]) -> p.ModelCard:
    for i, parent, c in await asyncio.to_thread(gateway.directory.listing):
        if i == model:
            return p.ModelCard(id=i, created=c, parent=parent, root=parent)
    raise ModelNotFound(model)


def _probe(ok: bool, what: str) -> Response:
    return JSONResponse({"status": "ok" if ok else what}, status_code=200 if ok else 503)


@router.get("/health/live")
async def live() -> Response:
    return _probe(True, "")


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    ok, body = gateway_of(request).health()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/health/startup")
async def startup(request: Request) -> Response:
    return _probe(gateway_of(request).startup_done, "starting")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gateway = gateway_of(request)
    if not gateway.settings.open_metrics:
        gateway.keys(request.headers.get("authorization"))
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
