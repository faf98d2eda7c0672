"""Config of dataset preparation (importers and the synthetic generator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rpg_dist.errors import ConfigError

FORMATS = ("s3rec", "amazon2014", "interactions", "synth")


@dataclass(kw_only=True)
class InteractionsColumns:
    """Column names of the generic ``interactions`` format."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    # Items table: id column and the columns joined (in order) into the item text.
    item_id: str = "item_id"
    text: list[str] = field(default_factory=lambda: ["title"])


@dataclass(kw_only=True)
class PrepareConfig:
    """Where ``rpg-dist run`` builds ``dataset`` from when it does not exist yet."""

    format: Literal["s3rec", "amazon2014", "interactions", "synth"]
    # s3rec: folder with sequences.txt + items.jsonl; amazon2014: folder with
    # reviews_<category>_5.json.gz + meta_<category>.json.gz; interactions: the interactions file.
    input: str = ""
    category: str = ""
    # interactions: the items table (CSV or parquet) and the column names of both files.
    items: str = ""
    columns: InteractionsColumns = field(default_factory=InteractionsColumns)
    # synth: catalogue size.
    n_items: int = 20_000
    n_users: int = 20_000

    def __post_init__(self) -> None:
        if self.format != "synth" and not self.input:
            raise ConfigError(f"input: required for format {self.format!r}")
        if self.format == "amazon2014" and not self.category:
            raise ConfigError("category: required for format 'amazon2014' (e.g. Beauty)")
        if self.format == "interactions" and not self.items:
            raise ConfigError("items: required for format 'interactions'")
        if self.format == "synth" and (self.n_items < 10 or self.n_users < 1):
            raise ConfigError("n_items: synth needs n_items >= 10 and n_users >= 1")
