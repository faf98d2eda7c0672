"""Config of leave-one-out evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

from rpg_dist.errors import ConfigError


@dataclass(kw_only=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10])
    batch_size: int = 256
    # Items scored per block in full ranking, so memory stays O(batch x block).
    item_block_size: int = 65_536
    full_ranking: bool = True
    # Users evaluated per split: a seeded sample of this many (0: every user, the paper's protocol).
    max_users: int = 0

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks: {self.ks} must be a non-empty list of positive integers")
        for name in ("batch_size", "item_block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.max_users < 0:
            raise ConfigError("max_users: must be >= 0 (0 = every user)")
