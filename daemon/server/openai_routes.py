"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions` (JSON, or SSE with
`stream: true`, ending `data: [DONE]`; `stream_options.include_usage` adds a last chunk with
usage and no choices, as OpenAI does), and `/v1/models`.

`model` must name the served model (or be "default" or absent): OpenAI answers an unknown model
with 404, and a benchmark that silently talks to another model than it asked for would report
the wrong numbers.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine.outputs import EngineOutput
from . import protocol as P
from .http_io import SERVICE, finish, output_error, prepare, read_json, send
from .protocol import ProtocolError
from .requests import GenerateRequest, parse_chat, parse_completion

if TYPE_CHECKING:
    from .service import Service
    from .streams import Prepared


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


def _check_model(service: Service, req: GenerateRequest) -> str:
    name = service.model_name
    if req.model not in (None, "", "default", name, service.config.model.path):
        raise ProtocolError(404, f"model {req.model!r} not found: this daemon serves {name!r} (see /v1/models)",
                            "model_not_found", param="model")
    return name


class _Logprobs:
    """Turns the engine's per-token logprobs into OpenAI's shapes."""

    def __init__(self, service: Service, top: int) -> None:
        self.tok = service.llm.tokenizer
        self.top = top

    def _entry(self, tid: int, lp: float) -> dict[str, Any]:
        b = self.tok.token_bytes(tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    def chat(self, o: EngineOutput) -> dict[str, Any] | None:
        if o.logprobs is None:
            return None
        content = []
        tops = o.top_logprobs or [[] for _ in o.logprobs]
        for tid, lp, top in zip(o.token_ids, o.logprobs, tops):
            e = self._entry(tid, lp)
            e["top_logprobs"] = [self._entry(t, v) for t, v in top[: self.top]]
            content.append(e)
        return {"content": content}

    def completion(self, o: EngineOutput, offset: int) -> dict[str, Any] | None:
        if o.logprobs is None:
            return None
        tokens, offsets = [], []
        for tid in o.token_ids:
            s = self.tok.token_bytes(tid).decode("utf-8", errors="replace")
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
        tops = o.top_logprobs or [[] for _ in o.logprobs]
        return {
            "tokens": tokens,
            "token_logprobs": list(o.logprobs),
            "top_logprobs": [{self._entry(t, v)["token"]: v for t, v in top[: self.top]} for top in tops],
            "text_offset": offsets,
        }


def _merge_chat_logprobs(acc: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    if new is None:
        return acc
    if acc is None:
        return new
    acc["content"] += new["content"]
    return acc


def _merge_completion_logprobs(acc: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    if new is None:
        return acc
    if acc is None:
        return new
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        acc[key] += new[key]
    return acc


def _usage(o: EngineOutput) -> dict[str, Any]:
    u = o.usage
    assert u is not None
    return P.openai_usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


def _reason(o: EngineOutput) -> str | None:
    return None if o.finish_reason is None else o.finish_reason.value


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _run(request: web.Request, req: GenerateRequest, chat: bool) -> web.StreamResponse:
    service = _service(request)
    model = _check_model(service, req)
    p: Prepared = await prepare(service, req)
    rid = ("chatcmpl-" if chat else "cmpl-") + p.request_id
    lp = _Logprobs(service, req.top_logprobs)
    stream = service.submit(p)
    async with stream:
        # The status line waits for the first output (see server.generate).
        o = await anext(stream)
        if o.finished and o.error:
            raise output_error(o)
        if not req.stream:
            text: list[str] = []
            acc: dict[str, Any] | None = None
            offset = 0
            while True:
                text.append(o.text)
                if chat:
                    acc = _merge_chat_logprobs(acc, lp.chat(o))
                else:
                    acc = _merge_completion_logprobs(acc, lp.completion(o, offset))
                offset += len(o.text)
                if o.finished:
                    break
                o = await anext(stream)
            if o.error:
                raise ProtocolError(500, o.error, "engine_error")
            build = P.chat_completion if chat else P.completion
            return web.json_response(build(rid, model, "".join(text), _reason(o), _usage(o), acc, p.created))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        inc = req.include_usage
        out: list[bytes] = []
        if chat:  # OpenAI's first chunk carries the role
            out.append(_sse(P.chat_chunk(rid, model, p.created, {"role": "assistant", "content": ""},
                                         include_usage=inc)))
        offset = 0
        try:
            while True:
                if o.error:
                    out.append(_sse(P.error_body("engine_error", o.error)))
                    break
                if o.text or o.token_ids or o.finished:
                    reason = _reason(o) if o.finished else None
                    if chat:
                        delta = {"content": o.text} if o.text or not o.finished else {}
                        chunk = P.chat_chunk(rid, model, p.created, delta, reason, lp.chat(o), inc)
                    else:
                        chunk = P.completion_chunk(rid, model, p.created, o.text, reason, lp.completion(o, offset), inc)
                    offset += len(o.text)
                    out.append(_sse(chunk))
                if o.finished and inc:
                    out.append(_sse(P.usage_chunk(rid, model, p.created, _usage(o), chat)))
                if o.finished:
                    break
                if not await send(request, resp, b"".join(out)):
                    return resp  # the client stopped reading: dropped (leaving `with` aborts)
                out = []
                o = await anext(stream)
        except ProtocolError as e:  # timed out mid-stream: the status line is gone
            out.append(_sse(P.error_body(e.type, e.message)))
        out.append(b"data: [DONE]\n\n")
        if await send(request, resp, b"".join(out)):
            await finish(request, resp)
        return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, parse_chat(await read_json(request)), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _run(request, parse_completion(await read_json(request)), chat=False)


async def models(request: web.Request) -> web.Response:
    service = _service(request)
    data = []
    if service.llm is not None:
        data.append({
            "id": service.model_name,
            "object": "model",
            "created": int(service.started),
            "owned_by": "inflightd",
            "max_model_len": service.engine.scheduler.next_limits.max_model_len,
        })
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)

