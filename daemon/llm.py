"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`,
`.chat(messages, params)`, `.tokenizer`.

All prompts are in flight together: each step decodes one token of every sequence past its
prompt and fills the rest of the token budget with prompt chunks, over the paged KV cache and
the Numba kernels (or, with `attention="reference"`, the contiguous reference cache that tests
compare against). Admission reserves KV room for prompt + max_tokens; the in-flight engine's
scheduler, with preemption and queue delays, takes this loop's place for the daemon.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import numba_kernels

from .chat_template import ChatTemplate
from .kv_cache import BlockManager
from .kv_storage import PagedKVCache, plan_num_blocks
from .model_runner import ModelRunner, measure_activation_peak
from .models.llama import LlamaModel
from .models.loader import LoadStats, load_model, open_gguf
from .offline_backends import Backend, PagedBackend, ReferenceBackend, Work
from .sampling import make_generator, sample
from .sampling_params import SamplingParams
from .store import resolve_model
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("inflightd.llm")

Message = dict[str, Any]


class PromptTooLongError(ValueError):
    """prompt + max_tokens exceed the model's context; the message gives both numbers."""


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    ttft_s: float = 0.0
    tpot_s: float = 0.0


@dataclass
class _Seq:
    seq_id: int
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    t_start: float
    t_first: float = 0.0
    computed: int = 0  # prompt tokens whose K/V are in the cache or being computed

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.out.prompt_token_ids)


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
        kv_cache_memory: int | str = "auto",
        max_num_batched_tokens: int = 2048,
    ) -> None:
        """`attention`: "paged" (the paged cache and Numba kernels, as the daemon runs) or
        "reference" (contiguous per-sequence buffers and torch SDPA, the oracle for tests)."""
        path = resolve_model(model)
        self.model_path = path
        self.model: LlamaModel
        self.load_stats: LoadStats
        if Path(path).is_dir():
            self.model, self.load_stats = load_model(path, dtype, device)
            self.tokenizer = Tokenizer.from_hf_dir(path)
        else:
            gguf = open_gguf(path)
            self.model, self.load_stats = load_model(path, dtype, device, gguf=gguf)
            self.tokenizer = Tokenizer.from_gguf_reader(gguf)
            del gguf  # releases the file mapping: the weights are copies
        self.max_model_len = min(max_model_len or self.model.config.max_position, self.model.config.max_position)
        self.max_num_batched_tokens = max_num_batched_tokens
        self._backend: Backend
        if attention == "reference":
            self._backend = ReferenceBackend(self.model)
        elif attention == "paged":
            numba_kernels.warmup(dtypes=(self.model.dtype,))
            peak = measure_activation_peak(self.model, max_num_batched_tokens, block_size)
            num_blocks = plan_num_blocks(
                self.model.config, block_size, self.model.dtype, self.model.device, kv_cache_memory, peak
            )
            kv = PagedKVCache(self.model.config, num_blocks, block_size, self.model.dtype, self.model.device)
            self.block_manager = BlockManager(num_blocks, block_size)
            self._backend = PagedBackend(ModelRunner(self.model, kv), self.block_manager)
        else:
            raise ValueError(f"attention must be 'paged' or 'reference', got {attention!r}")
        self._next_seq_id = 0
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
        for toks, p in zip(ids, params):
            if not toks:
                raise ValueError("empty prompt: nothing to condition on")
            if len(toks) + p.max_tokens > self.max_model_len:
                raise PromptTooLongError(
                    f"prompt ({len(toks)} tokens) + max_tokens ({p.max_tokens}) = {len(toks) + p.max_tokens} "
                    f"exceeds the model's context of {self.max_model_len} tokens"
                )
        now = time.perf_counter()
        seqs = []
        for text, toks, p in zip(texts, ids, params):
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.tokenizer.eos_token_ids)
            detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
            seqs.append(
                _Seq(self._next_seq_id, RequestOutput(text, list(toks)), p, make_generator(p), detok, stop_ids, now)
            )
            self._next_seq_id += 1
        waiting = deque(seqs)
        running: list[_Seq] = []
        try:
            while waiting or running:
                while waiting:
                    s = waiting[0]
                    cached = self._backend.admit(s.seq_id, s.out.prompt_token_ids, s.params.max_tokens)
                    if cached is None:
                        break
                    s.computed = s.out.cached_tokens = cached
                    running.append(waiting.popleft())
                self._step(running)
                for s in [s for s in running if s.out.finish_reason is not None]:
                    self._backend.release(s.seq_id)
                    running.remove(s)
        finally:
            for s in running:
                self._backend.release(s.seq_id)
        return [s.out for s in seqs]

    def _step(self, running: list[_Seq]) -> None:
        """Decode tokens of every sequence past its prompt, then prompt chunks up to the token
        budget (a long prompt is split over steps)."""
        work: list[Work] = []
        sampled: list[_Seq] = []
        budget = self.max_num_batched_tokens
        for s in running:
            if not s.prefilling:
                pos = len(s.out.prompt_token_ids) + len(s.out.token_ids) - 1
                work.append(Work(s.seq_id, [s.out.token_ids[-1]], pos, True, False))
                sampled.append(s)
                budget -= 1
        for s in running:
            if s.prefilling and budget > 0:
                prompt = s.out.prompt_token_ids
                n = min(budget, len(prompt) - s.computed)
                last = s.computed + n == len(prompt)
                work.append(Work(s.seq_id, prompt[s.computed : s.computed + n], s.computed, last, True))
                s.computed += n
                budget -= n
                if last:
                    sampled.append(s)
        if not work:
            return
        logits = self._backend.run(work)
        new = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
        now = time.perf_counter()
        for s, tok in zip(sampled, new):
            self._append(s, tok, now)

    @staticmethod
    def _append(s: _Seq, tok: int, now: float) -> None:
        out, p = s.out, s.params
        if not out.token_ids:
            s.t_first = now
            out.ttft_s = now - s.t_start
        out.token_ids.append(tok)
        n = len(out.token_ids)
        if n > 1:
            out.tpot_s = (now - s.t_first) / (n - 1)
        if tok in s.stop_ids:
            out.text += s.detok.flush()
            out.finish_reason = "stop"
            return
        before = len(out.text)
        out.text += s.detok.add(tok)
        if p.stop:
            # a stop string may straddle tokens: search only the tail it could end in
            longest = max(len(x) for x in p.stop)
            start = max(0, before - longest + 1)
            hits = [i for i in (out.text.find(x, start) for x in p.stop) if i >= 0]
            if hits:
                out.text = out.text[: min(hits)]
                out.finish_reason = "stop"
                return
        if n >= p.max_tokens:
            out.text += s.detok.flush()
            out.finish_reason = "length"
