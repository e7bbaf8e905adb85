"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`,
`.chat(messages, params)`, `.tokenizer`.

It runs the same in-flight engine as the daemon (scheduler, paged KV cache, Numba kernels),
with every prompt in flight together; `attention="reference"` swaps the paged runner for the
contiguous torch-SDPA oracle that tests compare against.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

import numba_kernels

from .engine.block_manager import BlockManager
from .engine.engine import Engine
from .engine.outputs import EngineOutput
from .engine.sampling_params import SamplingParams
from .engine.scheduler import Scheduler
from .engine.scheduler_config import RequestLimits, SchedulerConfig
from .engine.sequence import FinishReason
from .models.cpu_settings import CpuSettings
from .models.llama import LlamaModel
from .models.loader import LoadStats, load_model, open_gguf
from .runtime.model_runner import ModelRunner, ReferenceRunner, is_device_error, measure_activation_peak
from .runtime.paged_cache import PagedKVCache, plan_num_blocks
from .runtime.settings import cpu_settings
from .store.store import resolve_model
from .tokenizer.chat_template import ChatTemplate
from .tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Message = dict[str, Any]


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when torch sees a GPU, else "cpu"."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16). Without it torch's bf16
    matmuls convert to fp32 on the fly: measured 5–6.5× slower than fp32 at batch ≥ 8 on this
    project's CPUs (benchmarks/matmul_dtype.py), which costs far more than the halved weight
    traffic saves."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" → bfloat16 on a GPU that has it (else float16); on a CPU bfloat16 only with bf16
    instructions, else float32 (see `cpu_has_bf16`)."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def warm_kernels(model: LlamaModel) -> None:
    """Compile (or load from Numba's cache) every kernel the model's steps launch, on its own
    device and dtype: the CUDA kernels for a GPU model (a float16 one has no CPU kernels)."""
    numba_kernels.warmup(dtypes=(model.dtype,), device=str(model.device))
    model.warm_decode_tokens()


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None  # a str enum: == "stop" | "length" | "abort"
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    queue_s: float = 0.0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


T = TypeVar("T")


def run_on_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that exits when it returns (its exception re-raised here).

    OpenMP gives every thread that starts a parallel region its own worker pool for as long as
    that thread lives, and once the pools hold more threads than there are CPUs, libgomp cuts
    every worker's spin before sleeping (GOMP_SPINCOUNT) to ~100 iterations: the engine thread's
    short regions then pay a full wake-up each (benchmarks/model.py decoded one sequence at 19
    tok/s instead of 37 while it loaded a model on its main thread first). Start-up's parallel
    work (loading, compiling, the profiling forward) therefore runs on a thread whose pool goes
    with it."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            error.append(exc)

    t = threading.Thread(target=run, name="inflightd-start-up")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


# The offline default: every prompt is there from the start (no delay window), and a queue as
# long as the caller's list.
OFFLINE_SCHEDULER = SchedulerConfig(max_queue_delay_ms=0.0, max_waiting=1 << 30)


class LLM:
    def __init__(
        self,
        model: str = "default",
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int | None = None,
        *,
        attention: str = "paged",
        block_size: int = 16,
        kv_cache_memory: int | float | str = "auto",
        prefix_caching: bool = True,
        scheduler: SchedulerConfig = OFFLINE_SCHEDULER,
        queue_timeout_s: float = 0.0,
        cpu: CpuSettings | None = None,
    ) -> None:
        """`attention`: "paged" (the paged cache and Numba kernels, as the daemon runs) or
        "reference" (contiguous per-sequence buffers and torch SDPA, the oracle for tests).
        `device` and `dtype` may be "auto" (`resolve_device`, `resolve_dtype`). `max_model_len`
        is capped by the model's context. `scheduler`: how requests are batched (the daemon
        passes its config's section). `cpu`: how the model runs on a CPU (the defaults with the
        environment's INFLIGHTD_CPU_* overrides when None: `inflightd.runtime.settings`)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        cpu = cpu_settings() if cpu is None else cpu
        path = resolve_model(model)
        self.model_path = path
        self.model: LlamaModel
        self.load_stats: LoadStats

        def start_up() -> int:
            if Path(path).is_dir():
                self.model, self.load_stats = load_model(path, dtype, device, cpu=cpu)
                self.tokenizer = Tokenizer.from_hf_dir(path)
            else:
                gguf = open_gguf(path)
                self.model, self.load_stats = load_model(path, dtype, device, gguf=gguf, cpu=cpu)
                self.tokenizer = Tokenizer.from_gguf_reader(gguf)
                del gguf  # releases the file mapping: the weights are copies
            warm_kernels(self.model)
            return measure_activation_peak(self.model, scheduler.max_num_batched_tokens, block_size)

        peak = run_on_own_thread(start_up)
        self.max_model_len = min(max_model_len or self.model.config.max_position, self.model.config.max_position)
        num_blocks = plan_num_blocks(
            self.model.config, block_size, self.model.dtype, self.model.device, kv_cache_memory, peak
        )
        # The reference runner keeps per-sequence buffers: it cannot serve a prefix-cache hit.
        prefix_caching = prefix_caching and attention == "paged"
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        runner: ModelRunner | ReferenceRunner
        if attention == "paged":
            kv = PagedKVCache(self.model.config, num_blocks, block_size, self.model.dtype, self.model.device,
                              serial_work=cpu.serial_work)
            runner = ModelRunner(self.model, kv)
        elif attention == "reference":
            runner = ReferenceRunner(self.model)
        else:
            raise ValueError(f"attention must be 'paged' or 'reference', got {attention!r}")
        limits = RequestLimits(max_model_len=self.max_model_len, queue_timeout_s=queue_timeout_s)
        self.engine = Engine(
            runner, Scheduler(scheduler, self.block_manager, limits=limits), self.tokenizer, is_fatal=is_device_error
        )
        self.engine.start()
        # Stop the engine thread when this object goes or the interpreter exits: a thread left
        # blocked inside the runtime during interpreter teardown sometimes ended the process with
        # "terminate called without an active exception" (SIGABRT) after all work was done.
        weakref.finalize(self, self.engine.shutdown)
        self._next_request = 0
        tmpl = self.tokenizer.chat_template
        self.chat_template = (
            ChatTemplate(tmpl, bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token) if tmpl else None
        )

    # ------------------------------------------------------------------------------ public
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Text prompts (BOS added when the model asks for it) or lists of token ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts: list[str | None] = []
        ids: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                texts.append(p)
                ids.append(self.tokenizer.encode(p, add_special_tokens=True))
            else:
                texts.append(None)
                ids.append([int(t) for t in p])
        return self._run(texts, ids, self._params_list(params, len(ids)))

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> Any:
        """One conversation (a list of {role, content}) → one RequestOutput; a list of
        conversations → a list of them."""
        if self.chat_template is None:
            raise ValueError(f"{self.model_path.name} has no chat template; use generate()")
        single = bool(messages) and isinstance(messages[0], dict)
        convs = [messages] if single else list(messages)
        texts: list[str | None] = []
        ids = []
        for conv in convs:
            text = self.chat_template.render(list(conv), add_generation_prompt=add_generation_prompt)  # type: ignore[arg-type]
            texts.append(text)
            # the rendered template already holds BOS and role tokens as text
            ids.append(self.tokenizer.encode(text, add_special_tokens=False))
        outs = self._run(texts, ids, self._params_list(params, len(ids)))
        return outs[0] if single else outs

    # ---------------------------------------------------------------------------- the loop
    @staticmethod
    def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _run(self, texts: list[str | None], ids: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        outs = [RequestOutput(t, list(p)) for t, p in zip(texts, ids)]
        done = threading.Semaphore(0)
        rid = {}

        def sink_for(out: RequestOutput) -> Callable[[EngineOutput], None]:
            def sink(o: EngineOutput) -> None:  # runs on the engine thread
                out.token_ids += o.token_ids
                out.text += o.text
                if o.logprobs is not None:
                    out.logprobs = (out.logprobs or []) + o.logprobs
                if o.top_logprobs is not None:
                    out.top_logprobs = (out.top_logprobs or []) + o.top_logprobs
                if o.finished:
                    out.finish_reason = o.finish_reason
                    if o.usage is not None:
                        out.cached_tokens = o.usage.cached_tokens
                    if o.timing is not None:
                        out.ttft_s, out.tpot_s = o.timing.ttft_ms / 1e3, o.timing.tpot_ms / 1e3
                        out.queue_s = o.timing.queue_ms / 1e3
                    done.release()

            return sink

        try:
            for out, p in zip(outs, params):
                request_id = f"offline-{self._next_request}"
                self._next_request += 1
                self.engine.add_request(request_id, out.prompt_token_ids, p, sink_for(out))
                rid[request_id] = out
            for _ in outs:
                done.acquire()
        except BaseException:
            for request_id in rid:  # e.g. Ctrl-C, or a refused prompt: nothing left running
                self.engine.abort(request_id)
            raise
        if self.engine.error is not None:
            raise RuntimeError(f"generation failed: {self.engine.error}") from self.engine.error
        return outs

    def close(self) -> None:
        """Stop the engine thread (also done at interpreter exit: it is a daemon thread)."""
        self.engine.shutdown()
