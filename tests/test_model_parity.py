"""The model against transformers: logits (relative error ≤ 1e-4 in float32) and greedy
continuations, for the default GGUF and for tiny random Llama / Qwen2 checkpoints that these
tests write themselves (GGUF in several quant types, and safetensors folders)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from inflightd import LLM, SamplingParams
from inflightd.models.llama import LlamaModel
from inflightd.models.loader import _permute_qk, load_model
from inflightd.models.reference_cache import ContiguousKVCache

pytestmark = pytest.mark.slow  # loads the default model

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a land far away, there lived a",
    "Les fleurs du printemps sont 🌸 et",
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def our_logits(model: LlamaModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts in one flat batch → per prompt [len, vocab] logits at every position."""
    cache = ContiguousKVCache(model.config, model.dtype)
    for i, p in enumerate(prompts):
        cache.add_sequence(i, len(p))
    step = cache.plan(list(range(len(prompts))), [len(p) for p in prompts])
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = model.forward(ids, pos, lambda layer, q, k, v: cache.attend(step, layer, q, k, v))
    logits = model.logits(hidden)
    return [logits[step.query_start[i] : step.query_start[i + 1]] for i in range(len(prompts))]


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def hf_greedy(hf: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """n argmax steps with transformers' own KV cache and no end-of-sequence handling (the
    counterpart of ignore_eos; generate()'s min_new_tokens would mask EOS out instead)."""
    out: list[int] = []
    past = None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = hf(x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            out.append(int(r.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


# ------------------------------------------------------------------------------ default model
@pytest.fixture(scope="module")
def default_pair(default_gguf: Path) -> tuple[LLM, torch.nn.Module]:
    llm = LLM(model=str(default_gguf), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, torch_dtype=torch.float32
    ).eval()
    return llm, hf


def test_default_model_logits_match_transformers(default_pair: tuple[LLM, torch.nn.Module]) -> None:
    llm, hf = default_pair
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    ours = our_logits(llm.model, ids)
    for p, o in zip(ids, ours):
        assert rel_err(o, hf_logits(hf, p)) <= 1e-4


def test_default_model_greedy_matches_transformers(default_pair: tuple[LLM, torch.nn.Module]) -> None:
    llm, hf = default_pair
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for p, o in zip(ids, outs):
        assert o.finish_reason == "length"
        assert o.token_ids == hf_greedy(hf, p, 32)
        assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_chat_answers(default_pair: tuple[LLM, torch.nn.Module]) -> None:
    llm, _ = default_pair
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=24, temperature=0.0)
    )
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------- tiny checkpoints
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def tiny_hf(arch: str, seed: int, **extra: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=False, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True, **extra)
        model = transformers.Qwen2ForCausalLM(cfg)
    # default init has tiny std; widen so that attention patterns are not uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.05)
    return model.eval()


def random_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 49152, (n,), generator=g).tolist() for n in (1, 7, 33, 70)]


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", {}),
        ("qwen2", {}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
    ],
)
def test_safetensors_folder_matches_transformers(tmp_path: Path, arch: str, extra: dict) -> None:
    hf = tiny_hf(arch, seed=1, **extra)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model, _ = load_model(tmp_path, "float32")
    prompts = random_prompts(2)
    for p, o in zip(prompts, our_logits(model, prompts)):
        assert rel_err(o, hf_logits(hf, p)) <= 1e-4


def _kquant_blocks(qtype: gguf.GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant data (gguf-py has no K-quant quantizer): random bytes with the
    fp16 scale fields set to small finite values so weights land around ±0.05."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)

    def fp16(scale: float) -> np.ndarray:
        return (rng.uniform(0.5, 1.0, size=n) * scale).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[:, -2:] = fp16(2e-5)  # d sits last
    else:
        raw[:, 0:2] = fp16(1e-4)  # d
        raw[:, 2:4] = fp16(1e-4)  # dmin
    return raw.reshape(rows, cols // block * nbytes)


def write_tiny_gguf(
    path: Path,
    hf: torch.nn.Module,
    arch: str,
    qtype: gguf.GGMLQuantizationType,
    default_gguf: Path,
    rng: np.random.Generator,
) -> None:
    """The converter's layout (GGUF names, Q/K row permutation for llama) with the default
    model's tokenizer, so transformers can load it too."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    src = gguf.GGUFReader(str(default_gguf))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    sd = hf.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    K = gguf.GGMLQuantizationType
    for name, t in sd.items():
        g = names.get(name)
        if g is None:
            g = (
                name.replace("model.layers.", "blk.")
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.o_proj", "attn_output")
                .replace("mlp.gate_proj", "ffn_gate")
                .replace("mlp.up_proj", "ffn_up")
                .replace("mlp.down_proj", "ffn_down")
                .replace("post_attention_layernorm", "ffn_norm")
                .replace("input_layernorm", "attn_norm")
            )
        t = t.float()
        if arch == "llama" and ".attn_q." in g:
            t = _permute_qk(t, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in g:
            t = _permute_qk(t, cfg.num_key_value_heads)
        a = t.numpy()
        if a.ndim == 1 or qtype == K.F32:
            w.add_tensor(g, a)
        elif qtype in (K.Q4_K, K.Q5_K, K.Q6_K):
            w.add_tensor(g, _kquant_blocks(qtype, *a.shape, rng), raw_dtype=qtype)
        else:
            w.add_tensor(g, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


K = gguf.GGMLQuantizationType


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", K.F32),
        ("qwen2", K.F32),
        ("llama", K.F16),
        ("llama", K.BF16),
        ("llama", K.Q8_0),
        ("qwen2", K.Q4_0),
        ("llama", K.Q4_1),
        ("llama", K.Q4_K),
        ("qwen2", K.Q5_K),
        ("llama", K.Q6_K),
    ],
)
def test_tiny_gguf_matches_transformers(
    tmp_path: Path, default_gguf: Path, arch: str, qtype: gguf.GGMLQuantizationType
) -> None:
    hf = tiny_hf(arch, seed=3)
    path = tmp_path / f"tiny-{arch}-{qtype.name}.gguf"
    write_tiny_gguf(path, hf, arch, qtype, default_gguf, np.random.default_rng(4))
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    model, _ = load_model(path, "float32")
    prompts = random_prompts(5)
    for p, o in zip(prompts, our_logits(model, prompts)):
        assert rel_err(o, hf_logits(ref, p)) <= 1e-4
        if qtype == K.F32:  # lossless: the original model is a reference too, checking the Q/K permutation
            assert rel_err(o, hf_logits(hf, p)) <= 1e-4
    llm_ids = LLM(model=str(path), dtype="float32").generate(
        prompts[2:3], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    assert llm_ids[0].token_ids == hf_greedy(ref, prompts[2], 16)
