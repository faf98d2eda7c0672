"""Serving a trained run: top-k items for item histories, by graph decoding or full ranking.

    recommender = Recommender.load("runs/beauty")
    results = recommender.recommend([[12, 55, 901], [7]], k=10)   # one list of Recommendation per history

``rpg-dist recommend --run RUN_DIR --history 12,55,901 --k 10`` prints the same as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.decode.config import DecodeConfig
from rpg_dist.decode.graph_decode import GraphDecoder, random_start_items
from rpg_dist.decode.scoring import full_ranking_topk
from rpg_dist.errors import DataError
from rpg_dist.model.rpg import right_pad

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig



@dataclass(frozen=True)
class Recommendation:
    item_id: int
    score: float  # mean over digits of the item's token log-probabilities
    title: str


def parse_history(text: str) -> list[int]:
    """``"12,55,901"`` -> ``[12, 55, 901]``; anything but comma-separated integers is an error."""
    try:
        history = [int(token) for token in text.replace(" ", "").split(",") if token]
    except ValueError:
        raise DataError(f"--history {text!r}: expected comma-separated item ids, e.g. 12,55,901") from None
    if not history:
        raise DataError(f"--history {text!r}: empty history")
    return history


class Recommender:
    """A trained run loaded for serving: model, item codes, kNN graph and item titles."""

    def __init__(self, model, item_ids: np.ndarray, titles: np.ndarray, neighbors: torch.Tensor | None,
                 decode: DecodeConfig, max_seq_len: int) -> None:
        from rpg_dist.data.items import ItemIndex

        self.model = model
        self.index = ItemIndex(item_ids)
        self.titles = titles  # (N,) str, by dense row
        self.neighbors = neighbors
        self.decode_cfg = decode
        self.max_seq_len = max_seq_len

    @classmethod
    def load(cls, run_dir: str, storage: StorageConfig | None = None) -> Recommender:
        """Load ``run_dir`` (local or any fsspec URI) on CPU, without DeepSpeed or Ray.

        Raises:
            StageError: the run has no trained model (or no ``config.yaml``).
        """
        from rpg_dist.config import read_run_config
        from rpg_dist.data.dataset import read_items
        from rpg_dist.graph.store import load_graph
        from rpg_dist.model.export import load_model

        cfg = read_run_config(run_dir, storage)
        storage = storage or cfg.storage
        model = load_model(run_dir, storage)
        from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

        index = load_semantic_ids(RunPaths(run_dir).semantic_ids, storage).index
        neighbors = None
        if io.exists(RunPaths(run_dir).graph_manifest, storage):
            neighbors = torch.from_numpy(load_graph(run_dir, index, storage).neighbors)
        titles = _titles(read_items(cfg.dataset, storage, columns=None), index)
        return cls(model, index.item_ids, titles, neighbors, cfg.decode, cfg.model.max_seq_len)

    @torch.no_grad()
    def recommend(self, histories: list[list[int]], k: int = 10, full_ranking: bool = False) -> list[list[Recommendation]]:
        """Top-``k`` items after each history (item ids, oldest first), best first.

        Raises:
            DataError: a history holds an item id the catalogue does not know, or is empty; k is
                not between 1 and the catalogue's size.
        """
        n_items = len(self.index)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
            raise DataError(f"k: {k!r} must be a whole number from 1 to the catalogue's {n_items} items")
        items, lengths = self._batch(histories)
        log_probs = self.model.next_token_log_probs(items, lengths).float()  # (B, m, V)
        codes = self.model.item_codes
        if full_ranking or self.neighbors is None:
            rows, scores = full_ranking_topk(log_probs, codes, k)
        else:
            beams = max(self.decode_cfg.num_beams, k)
            decoder = GraphDecoder(codes, self.neighbors, beams, self.decode_cfg.steps)
            generator = torch.Generator().manual_seed(self.decode_cfg.seed)
            result = decoder.decode(log_probs, random_start_items(len(histories), codes.shape[0], beams, generator), k)
            rows, scores = result.items, result.scores
        ids = self.index.ids(rows.numpy())
        return [
            [Recommendation(int(i), float(s), str(self.titles[r])) for i, s, r in zip(id_row, score_row, row)]
            for id_row, score_row, row in zip(ids, scores.numpy(), rows.numpy())
        ]

    def _batch(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) dense rows of the last ``max_seq_len`` items of each history."""
        if not histories or any(len(h) == 0 for h in histories):
            raise DataError("every history needs at least one item id")
        trimmed = [h[-self.max_seq_len :] for h in histories]
        lengths = np.array([len(h) for h in trimmed])
        rows = self.index.rows([i for h in trimmed for i in h], what="history")
        return torch.from_numpy(right_pad(rows, lengths)), torch.from_numpy(lengths)


def _titles(items, index) -> np.ndarray:
    """Display title per dense row: the ``title`` column when the dataset has one, else the text."""
    column = "title" if "title" in items.column_names else "text"
    titles = np.array(items.column(column).to_pylist(), dtype=object)
    fallback = np.array(items.column("text").to_pylist(), dtype=object)
    titles = np.where(titles == None, fallback, titles)  # noqa: E711 (elementwise)
    out = np.empty(len(index), dtype=object)
    out[index.rows(items.column("item_id").to_numpy())] = titles
    return out


def print_recommendations(histories: list[list[int]], results: list[list[Recommendation]]) -> None:
    for history, recs in zip(histories, results):
        print(f"history: {','.join(map(str, history))}")
        print(f"{'rank':>4}  {'item_id':>9}  {'score':>8}  title")
        for rank, rec in enumerate(recs, start=1):
            print(f"{rank:>4}  {rec.item_id:>9}  {rec.score:>8.4f}  {rec.title[:90]}")
