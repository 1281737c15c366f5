"""The `vllm` runner: vLLM's v1 engine does the batched generation under our queue.

The engine thread steps vLLM's `LLMEngine` in-process (no engine-core process: one less
hop per token, and the order stays ours). The scheduler admits at most max_batch_size
requests, which is vLLM's max_num_seqs, so vLLM's own waiting queue only ever holds what it
is prefilling this step: the order is ours, and vLLM's paged attention, kernels and graph
compilation do the work. vLLM owns the KV cache (its blocks); a request we end for any
reason (EOS, deadline, cancellation, an error) is aborted there at once.
"""

from __future__ import annotations

import logging
import os

from ..config import EngineConfig
from ..cpus import EngineThreads
from ..request import Request
from .base import StepOutput

log = logging.getLogger(__name__)


def _utf8_locale() -> None:
    """Triton's stub runs Python under the C locale, so files open as ASCII; torch's compiler,
    which vLLM imports, reads UTF-8 templates. Text files open in UTF-8 from here on."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
            try:
                locale.setlocale(locale.LC_CTYPE, name)
                return
            except locale.Error:
                continue


def engine_args(config: EngineConfig, path: str, dtype: str):
    """vLLM's engine arguments for our config (vLLM's defaults otherwise, as `vllm serve` has them)."""
    from vllm import EngineArgs

    parallel = config.tensor_parallel_size * config.pipeline_parallel_size > 1
    return EngineArgs(model=path, tokenizer=path, dtype=dtype, max_num_seqs=config.max_batch_size,
                      max_model_len=config.max_seq_len, enforce_eager=config.enforce_eager, seed=0,
                      disable_log_stats=True, tensor_parallel_size=config.tensor_parallel_size,
                      pipeline_parallel_size=config.pipeline_parallel_size,
                      # one worker process per GPU, started and driven by vLLM's own executor
                      distributed_executor_backend="mp" if parallel else None)


class VllmRunner:
    def __init__(self, config: EngineConfig, engine=None, tokenizer=None):
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        from ..assets import resolve_llm
        from ..cpus import resolve_dtype
        from .torch.model import eos_ids

        path = resolve_llm(config.model)
        device = torch.device(config.device)
        dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
        if engine is None:
            engine = self._start(config, path, dtype)
        self.engine = engine
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        try:
            generation = GenerationConfig.from_pretrained(path)
        except OSError:
            generation = None
        self.eos_token_ids = eos_ids(generation, self.tokenizer)
        self.max_seq_len = min(config.max_seq_len, engine.model_config.max_model_len)
        self._live: dict[str, Request] = {}  # vLLM request id -> request, while vLLM holds it
        self._ids: dict[int, str] = {}  # request seq -> its vLLM request id now
        self.threads = EngineThreads(config.num_threads, config.device)
        log.info("vllm runner: %s in %s, max_num_seqs %d, max_model_len %d", path, dtype, config.max_batch_size,
                 self.max_seq_len)

    @staticmethod
    def _start(config: EngineConfig, path: str, dtype: str):
        # in-process engine core; on CPU a KV cache of kv_cache_gib (vLLM's own default takes 92% of memory)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if config.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
        _utf8_locale()
        from vllm.v1.engine.llm_engine import LLMEngine

        return LLMEngine.from_engine_args(engine_args(config, path, dtype))

    @staticmethod
    def _params(req: Request):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = req.sampling
        return SamplingParams(max_tokens=req.tokens_left, ignore_eos=req.ignore_eos, temperature=params.temperature,
                              top_p=params.top_p, top_k=params.top_k, seed=params.seed,
                              output_kind=RequestOutputKind.DELTA, detokenize=False, skip_special_tokens=False)

    @staticmethod
    def _key(req: Request) -> str:
        """vLLM's id for req; a preempted request comes back under a new one (its prompt now holds what it
        generated, and vLLM's prefix cache keeps that recompute short while the blocks last)."""
        return f"{req.seq}.{req.preemptions}" if req.preemptions else str(req.seq)

    def admit(self, reqs: list[Request]) -> StepOutput:
        """Hand the requests to vLLM; their prefill runs in the next step."""
        out = StepOutput()
        for req in reqs:
            key = self._key(req)
            try:
                self.engine.add_request(key, {"prompt_token_ids": list(req.context_ids)}, self._params(req))
                self._live[key] = req
                self._ids[req.seq] = key
            except Exception as exc:  # vLLM refused it (its own validation): this request alone fails
                out.failed.append((req, exc))
        return out

    def step(self, reqs: list[Request]) -> StepOutput:
        # without this vLLM's kernels fork a team over every core and fight Triton, the proxy and the
        # sends for them; vLLM's own server binds its engine the same way (cpus.EngineThreads)
        self.threads.bind("vllm runner")
        out = StepOutput()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # vLLM's step failed: everything it held fails
            log.exception("vllm step failed")
            out.failed = [(req, exc) for req in self._live.values()]
            for req in list(self._live.values()):
                self.release(req)
            return out
        for o in outputs:
            req = self._live.get(o.request_id)
            if req is None:  # already released (aborted between its last step and this one)
                continue
            if o.outputs and o.outputs[0].token_ids:
                out.tokens.append((req, list(o.outputs[0].token_ids)))
            if o.finished:
                del self._live[o.request_id]
                self._ids.pop(req.seq, None)
                out.stopped.append(req)
        return out

    def preempt(self, req: Request) -> None:
        """Aborted; it comes back under a new id, and vLLM's prefix cache keeps what it can of its blocks."""
        self.release(req)

    def release(self, req: Request) -> None:
        key = self._ids.pop(req.seq, None)  # the id it was admitted under (a preemption counts up after)
        if key is not None and self._live.pop(key, None) is not None:
            try:
                self.engine.abort_request([key])
            except Exception:
                log.warning("vllm: aborting request %s failed", key, exc_info=True)
