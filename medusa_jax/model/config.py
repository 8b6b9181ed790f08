"""Model configuration for Llama-family backbones, with named presets and HF config conversion."""

from __future__ import annotations

import dataclasses
from typing import Any

from medusa_jax.errors import MedusaError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style RoPE frequency scaling ("rope_type": "llama3")."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2 with `attention_bias`)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int = 0

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise MedusaError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise MedusaError(f"head_dim must be even for RoPE, got {self.head_dim}")

  # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------------

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a Hugging Face Llama/Qwen2/Mistral `config.json` dict."""
    try:
      heads = hf["num_attention_heads"]
      hidden = hf["hidden_size"]
      rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
      theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
      scaling = None
      if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
      elif rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise MedusaError(f"unsupported rope scaling type {rope.get('rope_type', rope.get('type'))!r}")
      eos = hf.get("eos_token_id", 2)
      eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
      pad = hf.get("pad_token_id")
      return cls(
          vocab_size=hf["vocab_size"],
          hidden_size=hidden,
          intermediate_size=hf["intermediate_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=heads,
          num_kv_heads=hf.get("num_key_value_heads") or heads,
          head_dim=hf.get("head_dim") or hidden // heads,
          rope_theta=float(theta),
          rope_scaling=scaling,
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
          tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
          attention_bias=bool(
              hf.get("attention_bias", hf.get("model_type") == "qwen2")
          ),
          max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
          bos_token_id=hf.get("bos_token_id"),
          eos_token_ids=tuple(int(e) for e in eos if e is not None),
          pad_token_id=int(pad if pad is not None else eos[0]),
      )
    except KeyError as e:
      raise MedusaError(f"config.json is missing the field {e.args[0]!r}") from None

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face `LlamaConfig` dict for this model (what `export_hf --format hf-llama` writes)."""
    rope_scaling = None
    if self.rope_scaling is not None:
      rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "attention_bias": self.attention_bias,
        "mlp_bias": False,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
    }


def _llama3_8b() -> ModelConfig:
  return ModelConfig(
      vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
      rope_scaling=RopeScaling(), rms_norm_eps=1e-5, max_position_embeddings=131_072,
      bos_token_id=128_000, eos_token_ids=(128_001, 128_009), pad_token_id=128_001,
  )


PRESETS: dict[str, ModelConfig] = {
    # Small enough for unit tests on one CPU core; GQA (4 heads over 2 KV heads).
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10_000.0, max_position_embeddings=2048,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100_000.0, tie_embeddings=True,
        max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
    ),
    "llama2-7b": ModelConfig(
        vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rope_theta=10_000.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    ),
    "llama3-8b": _llama3_8b(),
}


def preset(name: str) -> ModelConfig:
  """Returns the named preset, or raises a one-line error listing the known names."""
  if name not in PRESETS:
    raise MedusaError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]
