"""The HTTP gate: what Triton 2.51's own HTTP front end cannot survive is refused here, before it.

`ssjf serve` runs it on the public HTTP port and Triton's HTTP on a private loopback port behind it.
Triton 2.51 has no limit on a request body's size, inflates gzip and deflate bodies without bound,
and parses JSON recursively (a body nested 400,000 levels deep overflows its stack and kills the
server). The gate refuses, each with a JSON error and before anything reaches Triton:
  - a body over `max_body_bytes` (413), and any compressed body (415: Content-Encoding other than
    identity, so no size is ever checked before inflation);
  - a JSON body nested deeper than `max_json_depth` (400), found without recursion;
  - inference on the internal models (`llm`, `length_predictor`) without the admin key (403): the
    public surface is the ensemble, whose proxy step bounds every prompt before the LLM sees it.
Everything else passes through unchanged, responses streamed as they come (generate_stream's
server-sent events included). When Triton is down (restarting), readiness answers 503 at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

from .serving import json_depth

INTERNAL_MODELS = ("llm", "length_predictor")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
_MODEL_CALL = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/(infer|generate|generate_stream)$")


def refusal_by_headers(headers) -> tuple[int, str] | None:
    """Checked before the body is read (aiohttp would inflate it)."""
    encoding = headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return 415, f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed"
    return None


def refusal(method: str, path: str, headers, body: bytes, *, max_body_bytes: int, max_json_depth: int,
            admin_key: str) -> tuple[int, str] | None:
    """Why a request whose headers passed refusal_by_headers must not reach Triton, as (HTTP status,
    message), or None to let it through."""
    if len(body) > max_body_bytes:
        return 413, f"request body of {len(body)} bytes is over the limit of {max_body_bytes}"
    call = _MODEL_CALL.match(path)
    if call and call.group(1) in INTERNAL_MODELS and headers.get("ssjf-admin-key") != admin_key:
        return 403, f"model {call.group(1)!r} is internal: call the ensemble 'ssjf'"
    if body and method == "POST":
        # the binary tensor extension: a JSON header of this length, then raw tensor bytes
        json_part = body[: int(headers.get("Inference-Header-Content-Length") or len(body))]
        if json_depth(json_part.decode("utf-8", "replace")) > max_json_depth:
            return 400, f"request JSON nested deeper than {max_json_depth} levels"
    return None


class Gate:
    """An aiohttp reverse proxy on (host, port) in front of Triton's HTTP at upstream_url, on a thread
    of its own (start / stop)."""

    def __init__(self, host: str, port: int, upstream_url: str, admin_key: str, max_body_bytes: int = 1 << 20,
                 max_json_depth: int = 32):
        self.host, self.port, self.upstream = host, port, upstream_url.rstrip("/")
        self.limits = dict(max_body_bytes=max_body_bytes, max_json_depth=max_json_depth, admin_key=admin_key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> "Gate":
        self._thread = threading.Thread(target=self._run, name="ssjf-gate", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"the HTTP gate could not listen on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        # the body limit is checked again by refusal(); +1 so the size in its message is real
        app = web.Application(client_max_size=self.limits["max_body_bytes"] + 1)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # no idle keep-alive connections to Triton: on SIGTERM it waits for every HTTP connection to close
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, reuse_address=True).start()
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    async def _handle(self, request):
        import aiohttp
        from aiohttp import web

        refused = refusal_by_headers(request.headers)
        if refused is not None:
            return _error(*refused)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body is over the limit of {self.limits['max_body_bytes']} bytes")
        refused = refusal(request.method, request.path, request.headers, body, **self.limits)
        if refused is not None:
            return _error(*refused)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await self._session.request(request.method, self.upstream + request.rel_url.raw_path_qs,
                                                   headers=headers, data=body or None, allow_redirects=False)
        except aiohttp.ClientConnectionError:
            return _error(503, "server not ready: tritonserver is starting or restarting")
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers={k: v for k, v in upstream.headers.items()
                                                   if k.lower() not in HOP_BY_HOP})
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientError:  # Triton went away mid-stream: cut the client's connection too, so
                if request.transport is not None:  # it sees an error, never a clean end without a final
                    request.transport.close()
                return response
            await response.write_eof()
            return response


def _error(status: int, message: str):
    from aiohttp import web

    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")
