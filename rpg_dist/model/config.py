"""Config of RPG's parallel-ID transformer (GPT-2 style decoder + m projection heads)."""

from __future__ import annotations

from dataclasses import dataclass

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class ModelConfig:
    n_layer: int = 2
    d_model: int = 448
    n_head: int = 4
    d_ffn: int = 1024
    # Longest item history the model reads (training windows hold at most this many inputs).
    max_seq_len: int = 50
    embd_dropout: float = 0.5
    attn_dropout: float = 0.5
    resid_dropout: float = 0.0
    # Cosine logits are divided by this; the paper uses 0.03 on Beauty.
    temperature: float = 0.03
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model: {self.d_model} is not divisible by n_head ({self.n_head})")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1)")
        if self.temperature <= 0:
            raise ConfigError("temperature: must be > 0")
        for name in ("n_layer", "d_model", "n_head", "d_ffn", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
