"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`,
`.chat(messages, params)`, `.tokenizer`.

Generation here is the reference loop: every prompt is prefilled in one flat batch, then all
unfinished sequences decode together, one token each per step, over the contiguous reference
KV cache. The in-flight engine (scheduler, paged cache, kernels) takes its place later; this loop
stays as the oracle its outputs are compared against.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chat_template import ChatTemplate
from .models.llama import ContiguousKVCache, LlamaModel
from .models.loader import LoadStats, load_model, open_gguf
from .sampling import make_generator, sample
from .sampling_params import SamplingParams
from .store import resolve_model
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("inflightd.llm")

Message = dict[str, Any]

# Tokens prefilled in one forward: bounds the activation peak when many long prompts arrive.
_PREFILL_TOKENS = 4096


class PromptTooLongError(ValueError):
    """prompt + max_tokens exceed the model's context; the message gives both numbers."""


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
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


class LLM:
    def __init__(
        self,
        model: str = "default",
        device: str = "cpu",
        dtype: str = "float32",
        max_model_len: int | None = None,
    ) -> None:
        path = resolve_model(model)
        self.model_path = path
        self.model: LlamaModel
        self.load_stats: LoadStats
        if Path(path).is_dir():
            self.model, self.load_stats = load_model(path, dtype, device)
            self.tokenizer = Tokenizer.from_hf_dir(path)
        else:
            reader = open_gguf(path)
            self.model, self.load_stats = load_model(path, dtype, device, gguf_reader=reader)
            self.tokenizer = Tokenizer.from_gguf_reader(reader)
            del reader  # releases the file mapping: the weights are copies
        self.max_model_len = min(max_model_len or self.model.config.max_position, self.model.config.max_position)
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
        cache = ContiguousKVCache(self.model.config, self.model.dtype, self.model.device)
        now = time.perf_counter()
        seqs = []
        for i, (text, toks, p) in enumerate(zip(texts, ids, params)):
            cache.add_sequence(i, len(toks) + p.max_tokens)
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.tokenizer.eos_token_ids)
            seqs.append(
                _Seq(i, RequestOutput(text, list(toks)), p, make_generator(p),
                     IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True), stop_ids, now)
            )
        # prefill in groups of whole prompts, then decode everyone together
        group: list[_Seq] = []
        for s in seqs:
            group.append(s)
            if sum(len(g.out.prompt_token_ids) for g in group) >= _PREFILL_TOKENS:
                self._step(cache, group, prefill=True)
                group = []
        if group:
            self._step(cache, group, prefill=True)
        running = [s for s in seqs if s.out.finish_reason is None]
        while running:
            self._step(cache, running, prefill=False)
            running = [s for s in running if s.out.finish_reason is None]
        return [s.out for s in seqs]

    def _step(self, cache: ContiguousKVCache, seqs: list[_Seq], *, prefill: bool) -> None:
        if prefill:
            chunks = [s.out.prompt_token_ids for s in seqs]
            pos = [torch.arange(len(c)) for c in chunks]
        else:
            chunks = [[s.out.token_ids[-1]] for s in seqs]
            pos = [torch.tensor([len(s.out.prompt_token_ids) + len(s.out.token_ids) - 1]) for s in seqs]
        dev = self.model.device
        input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=dev)
        positions = torch.cat(pos).to(dev)
        step = cache.plan([s.seq_id for s in seqs], [len(c) for c in chunks])
        hidden = self.model.forward(input_ids, positions, lambda layer, q, k, v: cache.attend(step, layer, q, k, v))
        last = torch.tensor(step.query_start[1:], device=dev) - 1
        logits = self.model.logits(hidden[last])
        new = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.perf_counter()
        for s, tok in zip(seqs, new):
            self._append(s, tok, now)
            if s.out.finish_reason is not None:
                cache.free(s.seq_id)

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
