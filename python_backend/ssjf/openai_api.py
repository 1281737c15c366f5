"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` (streamed as server-sent
events or not) and `/v1/models`, in front of the `ssjf` ensemble, so the proxy and the queue apply.

`ssjf serve` runs it on OPENAI_PORT (9000) beside Triton's ports. A small ASGI app (FastAPI on
uvicorn) over tritonclient's asyncio gRPC client: each request is one gRPC stream to the ensemble
(`messages` for chat, `text_input` for completions). Errors come back OpenAI-shaped: 400 naming the
field for what the server refused, 503 when the queue is full or the server is not up. A client
that disconnects ends its gRPC stream; since Triton 2.51 passes no cancellation into an ensemble,
the request also carries a deadline (`timeout` in the body, else the server's request timeout).
Extension: `priority` (an integer class, lower first), as vLLM takes it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from .request import RequestError, check_stops
from .serving import INPUTS

FIELDS = {i.name for i in INPUTS if i.client}  # what an error's field may name
UNSUPPORTED = ("n", "logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias", "echo",
               "best_of", "suffix")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def from_triton(message: str) -> APIError:
    """Our server names the field first ("max_tokens: must be >= 1"); the queue bound is a 503."""
    message = message.removeprefix("in ensemble 'ssjf', ").strip()
    if message.startswith("queue full") or "shutting down" in message or "Server is stopping" in message:
        return APIError(503, message, kind="server_error")
    field = message.split(":", 1)[0].split("[", 1)[0]
    return APIError(400, message, param=field if field in FIELDS else None)


def parse_body(body: dict, chat: bool) -> dict:
    """OpenAI request fields -> the ensemble's inputs (checked here only where OpenAI's names differ)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        value = body.get(name)
        if not (value is None or value is False or (name == "n" and value == 1 and value is not True)):
            raise APIError(400, f"{name}: not supported by this server", param=name)
    out: dict = {"messages": _messages(body.get("messages"))} if chat else {"text_input": _prompt(body.get("prompt"))}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise APIError(400, "max_tokens: expected an integer", param="max_tokens")
        out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "priority"):  # top_k, priority: extensions, as vLLM's
        if body.get(name) is not None:
            value = body[name]
            integer = name in ("top_k", "seed", "priority")
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise APIError(400, f"{name}: expected {'an integer' if integer else 'a number'}", param=name)
            out[name] = value
    if body.get("ignore_eos") is not None:
        out["ignore_eos"] = bool(body["ignore_eos"])
    stop = _stops(body.get("stop"))
    if stop:
        out["stop"] = stop  # the engine's stop rule ends the text before the first of them
    out["_stream"] = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    out["_usage_in_stream"] = bool(options.get("include_usage")) if isinstance(options, dict) else False
    return out


def _messages(messages) -> str:
    """A chat's messages as the ensemble's `messages` input (JSON); content parts must be text."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(m, dict) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}]: expected an object with role and string content", param="messages")
        turns.append({"role": m.get("role"), "content": content})
    return json.dumps(turns)


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt: expected one string", param="prompt")
    return prompt


def _stops(stop) -> list[str]:
    """`stop`: a string or a list of them, checked as the engine checks them (request.check_stops)."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise APIError(400, "stop: expected a string or a list of strings", param="stop")
    try:
        check_stops(stops)
    except RequestError as exc:
        raise APIError(400, str(exc), param="stop") from None
    return stops


def triton_inputs(fields: dict):
    """The ensemble's input tensors for parse_body's fields, as serving.INPUTS types them: streamed,
    each response with its finish reason and token count."""
    import tritonclient.grpc as grpcclient

    fields = {**fields, "stream": True, "return_finish_reason": True, "return_num_output_tokens": True}
    inputs = []
    for spec in INPUTS:
        if spec.client and spec.name in fields:
            value = fields[spec.name]
            values = value if spec.kind == "strings" else [value]
            t = grpcclient.InferInput(spec.name, [1, len(values)], spec.wire_type)
            t.set_data_from_numpy(np.array([[v.encode("utf-8") if isinstance(v, str) else v for v in values]],
                                           dtype=spec.numpy))
            inputs.append(t)
    return inputs


class OpenAIServer:
    """The app and its uvicorn server on a thread of its own (start / stop)."""

    def __init__(self, host: str, port: int, grpc_url: str, model_name: str, tokenizer=None,
                 request_timeout_s: float = 600.0, cpus: set[int] | None = None):
        """cpus: the cores the API's thread runs on (on a CPU host, those the engine leaves free)."""
        self.host, self.port, self.grpc_url, self.model_name = host, port, grpc_url, model_name
        self.tokenizer = tokenizer
        self.request_timeout_s = request_timeout_s
        self.cpus = cpus
        self._server = None
        self._thread: threading.Thread | None = None
        self._client = None  # one gRPC channel for every request, opened on the server's event loop

    def count(self, text: str | None = None, messages: str | None = None) -> int:
        if self.tokenizer is None:
            return 0
        if messages is not None:
            ids = self.tokenizer.apply_chat_template(json.loads(messages), add_generation_prompt=True, tokenize=True)
            return len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return len(self.tokenizer.encode(text or "", add_special_tokens=False))

    def app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse

        api = FastAPI(title="ssjf OpenAI-compatible API")

        @api.exception_handler(APIError)
        async def _api_error(request, exc: APIError):
            return JSONResponse(exc.body(), status_code=exc.status)

        @api.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                 "owned_by": "ssjf"}]}

        async def handle(request: Request, chat: bool):
            try:
                body = await request.json()
            except (ValueError, RecursionError):
                raise APIError(400, "the request body is not valid JSON")
            fields = parse_body(body, chat)
            if fields["_stream"]:
                return StreamingResponse(self._sse(request, fields, chat), media_type="text/event-stream")
            text, finish, usage = await self._collect(fields)
            return self._final(fields, chat, text, finish, usage)

        @api.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, chat=True)

        @api.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        return api

    # ---- one request: a gRPC stream to the ensemble -------------------------------------------
    async def _pieces(self, fields: dict):
        """Yield the ensemble's responses as (text, output tokens it covers, finish reason: on the
        final one); raises APIError for an error response."""
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            self._client = aio.InferenceServerClient(self.grpc_url)
        request = {"model_name": "ssjf", "inputs": triton_inputs(fields), "request_id": uuid.uuid4().hex,
                   "enable_empty_final_response": True, "timeout": int(self.request_timeout_s * 1e6)}

        async def one():
            yield request

        stream = self._client.stream_infer(one())
        try:
            async for result, error in stream:
                if error is not None:
                    raise from_triton(error.message() if isinstance(error, InferenceServerException) else str(error))
                piece, tokens = result.as_numpy("text_output"), result.as_numpy("num_output_tokens")
                reason = result.as_numpy("finish_reason")
                yield (piece.reshape(-1)[0].decode("utf-8") if piece is not None and piece.size else "",
                       0 if tokens is None else int(tokens.reshape(-1)[0]),
                       (reason.reshape(-1)[0].decode() or None) if reason is not None else None)
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        except InferenceServerException as exc:
            raise APIError(503, f"server not available: {exc.message()}", kind="server_error") from None
        finally:
            stream.cancel()  # a client gone mid-stream ends the gRPC call here

    def _usage(self, fields: dict, completion: int) -> dict:
        prompt = self.count(text=fields.get("text_input"), messages=fields.get("messages"))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _collect(self, fields: dict) -> tuple[str, str, dict]:
        parts, tokens, finish = [], 0, None
        async for text, n, reason in self._pieces(fields):
            parts.append(text)
            tokens, finish = tokens + n, reason or finish
        return "".join(parts), finish or "stop", self._usage(fields, tokens)

    def _final(self, fields, chat, text, finish, usage) -> dict:
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [choice], "usage": usage}
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], "usage": usage}

    async def _sse(self, request, fields: dict, chat: bool):
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        tokens, finish = 0, None
        try:
            if chat:
                yield chunk(role=True)
            async for piece, n, reason in self._pieces(fields):
                if await request.is_disconnected():
                    return  # closing the generator cancels the gRPC stream
                tokens, finish = tokens + n, reason or finish
                if piece:
                    yield chunk(piece)
            yield chunk(finish=finish or "stop")
            if fields["_usage_in_stream"]:
                usage = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [],
                         "usage": self._usage(fields, tokens)}
                yield f"data: {json.dumps(usage)}\n\n"
        except APIError as exc:  # after the headers: the error goes in the stream, as OpenAI's servers do
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "OpenAIServer":
        import uvicorn

        config = uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="ssjf-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._server.started:
            raise RuntimeError(f"the OpenAI API could not listen on {self.host}:{self.port}")
        return self

    def _run(self) -> None:
        if self.cpus:  # this thread only (and the gRPC threads it starts): the engine keeps its cores
            os.sched_setaffinity(0, self.cpus)
        self._server.run()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
