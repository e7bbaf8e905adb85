"""Model hyper-parameters: one frozen dataclass, built from GGUF metadata or a Hugging Face
config.json. Everything the forward pass needs to know about a checkpoint's shape lives here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# Architectures whose forward is the Llama decoder; the value says whether q/k/v carry a bias.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": True}


class ModelConfigError(ValueError):
    """A checkpoint's metadata is missing a key or describes an unsupported model."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent scaling ("rope_type": "llama3"), or linear scaling."""

    kind: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int
    rms_norm_eps: float
    rope_theta: float
    rope_dim: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ModelConfigError(f"rope dimension {self.rope_dim} does not fit head_dim {self.head_dim}")

    @cached_property
    def qkv_bias(self) -> bool:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None) -> ModelConfig:
        """`meta`: GGUF key → value (strings/ints/floats/lists already decoded)."""
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelConfigError("GGUF file has no general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is None:
                raise ModelConfigError(f"GGUF file lacks {full}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(get("attention.key_length", hidden // heads))
        n_vocab = vocab_size or meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not n_vocab:
            raise ModelConfigError(f"GGUF file gives no vocabulary size ({arch}.vocab_size)")
        scaling = None
        kind = meta.get(f"{arch}.rope.scaling.type")
        if kind == "linear":
            scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
        # llama3 scaling arrives as a rope_freqs tensor of per-frequency divisors (see llama.py).
        return cls(
            architecture=arch,
            num_layers=int(get("block_count")),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(n_vocab),
            max_position=int(get("context_length", 4096)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_dim=int(get("rope.dimension_count", head_dim)),
            tie_word_embeddings=False,  # decided by the loader: tied when output.weight is absent
            rope_scaling=scaling,
            name=str(meta.get("general.name", "")),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """`cfg`: a parsed Hugging Face config.json."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
            scaling = None
            rope_type = rope.get("rope_type") or rope.get("type")
            if rope_type == "llama3":
                scaling = RopeScaling(
                    "llama3",
                    float(rope["factor"]),
                    float(rope.get("low_freq_factor", 1.0)),
                    float(rope.get("high_freq_factor", 4.0)),
                    int(rope.get("original_max_position_embeddings", 8192)),
                )
            elif rope_type == "linear":
                scaling = RopeScaling("linear", float(rope["factor"]))
            elif rope_type not in (None, "default"):
                raise ModelConfigError(f"unsupported rope scaling type {rope_type!r} in config.json")
            return cls(
                architecture=model_type,
                num_layers=int(cfg["num_hidden_layers"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                vocab_size=int(cfg["vocab_size"]),
                max_position=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_dim=head_dim,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_scaling=scaling,
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise ModelConfigError(f"config.json lacks {exc.args[0]!r}") from None
