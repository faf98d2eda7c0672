"""Serving a trained run: top-k items for item histories, by graph decoding or full ranking.

    recommender = Recommender.load("runs/beauty")
    results = recommender.recommend([[12, 55, 901], [7]], k=10)   # one list of Recommendation per history

``rpg-dist recommend --run RUN_DIR --history 12,55,901 --k 10`` prints the same as a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.decode.config import DecodeConfig
from rpg_dist.decode.graph_decode import GraphDecoder, start_items
from rpg_dist.decode.scoring import full_ranking_topk, popularity_prior
from rpg_dist.decode.transitions import Transitions, last_items, rerank
from rpg_dist.decode.sharded import ShardedGraphDecoder
from rpg_dist.errors import DataError
from rpg_dist.model.rpg import right_pad

if TYPE_CHECKING:
    from rpg_dist.config import StorageConfig



@dataclass(frozen=True)
class Recommendation:
    item_id: int
    score: float  # mean over digits of the item's token log-probabilities, plus the configured priors
    title: str


def parse_history(text: str, flag: str = "--history") -> list[int]:
    """``"12,55,901"`` -> ``[12, 55, 901]``; anything but comma-separated integers is an error."""
    try:
        history = [int(token) for token in text.replace(" ", "").split(",") if token]
    except ValueError:
        raise DataError(f"{flag} {text!r}: expected comma-separated item ids, e.g. 12,55,901") from None
    if not history:
        raise DataError(f"{flag} {text!r}: no item ids")
    return history


@dataclass
class Ranked:
    """Top items of a batch of queries, best first."""

    rows: torch.Tensor  # (B, K) int64 item rows; -1 past a query's own k (or where items ran out)
    scores: torch.Tensor  # (B, K) float32; -inf where rows is -1
    n_visited: torch.Tensor  # (B,) int64 items scored per query


class Recommender:
    """A trained run loaded for serving: model, item codes, kNN graph, item titles and popularity.

    ``rank`` is the one vectorised entry point (the service batches requests into it);
    ``recommend`` wraps it for lists of item ids.
    """

    def __init__(self, model, item_ids: np.ndarray, titles: np.ndarray, neighbors: torch.Tensor | None,
                 popularity: torch.Tensor, decode: DecodeConfig, max_seq_len: int,
                 transitions: Transitions | None = None) -> None:
        from rpg_dist.data.items import ItemIndex

        self.model = model
        self.index = ItemIndex(item_ids)
        self.titles = titles  # (N,) str, by dense row
        self.neighbors = neighbors  # (N, k) int32 graph rows, or None: full ranking only
        self.popularity = popularity  # (N,) int64 training occurrences (popular / history starts)
        self.decode_cfg = decode
        self.max_seq_len = max_seq_len
        # Training successors for the transition prior (decode.transition_weight > 0), else None.
        self.transitions = transitions
        # GraphDecoder copies the codes into its layout once: one decoder per beam width, reused.
        self._decoders: dict[int, GraphDecoder] = {}
        # (N,) items taken out of the catalogue (catalogue.py): never answered, never a neighbour.
        self.withdrawn = torch.zeros(len(self.index), dtype=torch.bool)
        self._tables: torch.Tensor | None = None  # (m, V, V) digit cosine tables, for graph changes
        # (shard handles, (N,) partition of every item) when the lists live in GraphShards instead.
        self.shards: tuple[list, np.ndarray] | None = None
        self.version = 0  # the catalogue version served
        self._prior: torch.Tensor | None = None  # (N,) item prior, cached; cleared when items change

    @classmethod
    def load(cls, run_dir: str, storage: StorageConfig | None = None, start: str | None = None,
             changes: bool = True, lists: bool = True, method: str | None = None) -> Recommender:
        """Load ``run_dir`` (local or any fsspec URI) on CPU, without DeepSpeed or Ray.

        ``start`` overrides the run's ``decode.start`` (random, popular or history), ``method`` its
        ``decode.method`` (auto, graph or full); ``changes``
        replays the catalogue's committed changes (catalogue.py) on the trained one; without
        ``lists`` the graph is not read (``use_shards`` decodes over shards that hold it).

        Raises:
            StageError: the run has no trained model (or no ``config.yaml``).
        """
        from rpg_dist.config import read_run_config
        from rpg_dist.data.dataset import read_items, read_sequences
        from rpg_dist.data.splits import leave_one_out
        from rpg_dist.evaluation.stage import popularity, training_transitions
        from rpg_dist.graph.store import load_graph
        from rpg_dist.model.export import load_model
        from rpg_dist.tokenizer.semantic_ids import load_semantic_ids

        cfg = read_run_config(run_dir, storage)
        storage = storage or cfg.storage
        model = load_model(run_dir, storage)
        model.eval()
        index = load_semantic_ids(RunPaths(run_dir).semantic_ids, storage).index
        neighbors = None
        if lists and io.exists(RunPaths(run_dir).graph_manifest, storage):
            neighbors = torch.from_numpy(load_graph(run_dir, index, storage).neighbors)
        titles = _titles(read_items(cfg.dataset, storage, columns=None), index)
        decode = dataclasses.replace(cfg.decode, start=start or cfg.decode.start, method=method or cfg.decode.method)
        counts, transitions = torch.zeros(len(index), dtype=torch.int64), None
        if decode.start != "random" or decode.transition_weight or decode.popularity_weight:
            split = leave_one_out(read_sequences(cfg.dataset, storage), max_len=cfg.model.max_seq_len)
            counts = popularity(split.train, index)
            transitions = training_transitions(cfg, split.train, index)
        recommender = cls(model, index.item_ids, titles, neighbors, counts, decode, cfg.model.max_seq_len,
                          transitions)
        if changes:
            from rpg_dist import catalogue

            recommender.version = catalogue.replay(recommender, run_dir, storage)
        return recommender

    @torch.no_grad()
    def recommend(self, histories: list[list[int]], k: int = 10, full_ranking: bool = False,
                  exclude_history: bool = False) -> list[list[Recommendation]]:
        """Top-``k`` items after each history (item ids, oldest first), best first.

        Raises:
            DataError: a history holds an item id the catalogue does not know, or is empty; k is
                not between 1 and the catalogue's size.
        """
        n_items = len(self.index)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_items:
            raise DataError(f"k: {k!r} must be a whole number from 1 to the catalogue's {n_items} items")
        items, lengths = self._batch(histories)
        ranked = self.rank(items, lengths, torch.full((len(histories),), k),
                           torch.full((len(histories),), exclude_history), full_ranking)
        return [
            [Recommendation(int(self.index.item_ids[r]), float(s), str(self.titles[r]))
             for r, s in zip(rows, scores) if r >= 0]
            for rows, scores in zip(ranked.rows.tolist(), ranked.scores.tolist())
        ]

    @property
    def decoding(self) -> str:
        """How ``rank`` answers: "graph" or "full_ranking" (``decode.method`` at this catalogue size;
        full ranking without a graph, graph decoding over shards)."""
        if self.shards is not None:
            return "graph"
        if self.neighbors is None or self.decode_cfg.resolved_method(len(self.index)) == "full":
            return "full_ranking"
        return "graph"

    @torch.no_grad()
    def rank(self, items: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, exclude: torch.Tensor,
             full_ranking: bool = False) -> Ranked:
        """Top ``k[i]`` item rows after each history, as ``decoding`` says (``full_ranking``: full
        ranking whatever it says).

        Args:
            items: (B, T) history rows, right-padded with -1 (at most ``max_seq_len`` per row).
            lengths: (B,) history lengths, >= 1.
            k: (B,) items wanted per query, 1..n_items.
            exclude: (B,) bool, drop the query's own history items from its answer.
        """
        n_items = len(self.index)
        # Excluded history items can take up to len(history) places: rank that many more.
        need = torch.clamp(k + torch.where(exclude, lengths, 0), max=n_items)  # (B,)
        log_probs = self.model.next_token_log_probs(items, lengths).float()  # (B, m, V)
        if full_ranking or self.decoding == "full_ranking":
            # Withdrawn items can take places too (graph lists never hold them).
            width = min(n_items, int(need.max()) + int(self.withdrawn.sum()))
            rows, scores = self._with_prior(log_probs, items, lengths,
                                            *full_ranking_topk(log_probs, self.model.item_codes, width,
                                                               prior=self.item_prior()))
            visited = torch.full((len(lengths),), n_items, dtype=torch.int64)
            return _keep_top(rows, scores, visited, items, exclude, k, self.withdrawn)
        beams = beam_widths(need, self.decode_cfg.num_beams, n_items)
        width = int(beams.max())
        rows = torch.full((len(lengths), width), -1, dtype=torch.int64)
        scores = torch.full((len(lengths), width), float("-inf"))
        visited = torch.zeros(len(lengths), dtype=torch.int64)
        # One decode per beam width (a handful: widths are num_beams times powers of two), so a
        # query's answer depends on its own k and history only, never on the batch it came in.
        for b in beams.unique().tolist():
            group = torch.nonzero(beams == b).squeeze(1)
            result = self._decode(log_probs[group], items[group], lengths[group], b)
            rows[group, :b], scores[group, :b], visited[group] = result.items, result.scores, result.n_visited
        rows, scores = self._with_prior(log_probs, items, lengths, rows, scores)
        return _keep_top(rows, scores, visited, items, exclude, k, self.withdrawn)

    def _with_prior(self, log_probs: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
                    scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranked (B, K) ``rows`` and ``scores`` with the transition prior added, when configured."""
        if self.transitions is None:
            return rows, scores
        last = last_items(items, lengths)  # (B,)
        return rerank(log_probs, self.model.item_codes, rows, scores, last, self.transitions,
                      self.decode_cfg.transition_weight, rows.shape[1], self.withdrawn, self.item_prior())

    def item_prior(self) -> torch.Tensor | None:
        """(N,) the popularity prior of every item (decode.popularity_weight), or None; items added
        since training count 0 occurrences."""
        if self._prior is None:
            self._prior = popularity_prior(self.popularity, self.decode_cfg.popularity_weight)
        return self._prior

    def _decode(self, log_probs: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor, beams: int):
        decode = dataclasses.replace(self.decode_cfg, num_beams=beams)
        generator = torch.Generator().manual_seed(decode.seed)
        # Withdrawn history items do not seed beams (their lists are empty anyway).
        seeds = torch.where((items >= 0) & self.withdrawn[items.clamp(min=0)], -1, items)
        decoder = self._decoder(beams)
        lists = self.neighbors if self.shards is None else decoder
        start = start_items(decode, seeds, lengths, lists, self.popularity, len(self.index), generator)
        return decoder.decode(log_probs, start)

    def use_shards(self, shards: list, partition: np.ndarray) -> None:
        """Decode through ``shards`` (a GraphShard actor or deployment per partition; ``partition``
        (N,) the owner of every item) instead of lists in this process. The catalogue is then the
        built graph's: ``add_items`` and ``withdraw`` refuse. The shards add the popularity prior
        themselves (``GraphShard.load_partition(..., with_prior=True)``, as ``serve`` starts them)."""
        self.shards = (list(shards), np.asarray(partition, np.int32))
        self.neighbors = None
        self._decoders.clear()

    def add_items(self, item_ids: np.ndarray, codes: np.ndarray, titles: list[str]) -> None:
        """Insert new items: rows are re-dealt in id order, the graph gets their exact lists and
        the reverse edges they earn (graph/update.py). ``codes`` (n, m) from the trained tokenizer."""
        from rpg_dist.data.items import ItemIndex
        from rpg_dist.graph.update import insert_items

        self._check_local_graph()
        n_old = len(self.index)
        all_ids = np.concatenate([self.index.item_ids, np.asarray(item_ids, np.int64)])
        index = ItemIndex(all_ids)
        to_row = torch.from_numpy(index.rows(all_ids))  # (n_old + n_new,) new row of each entry
        old = to_row[:n_old]
        codes_all = torch.empty(len(all_ids), codes.shape[1], dtype=torch.int16)
        codes_all[to_row] = torch.cat([self.model.item_codes.cpu(), torch.from_numpy(np.array(codes, np.int16))])
        titles_all = np.empty(len(all_ids), dtype=object)
        titles_all[to_row.numpy()] = np.concatenate([self.titles, np.array(list(titles), dtype=object)])
        self.popularity = _moved(self.popularity, old, len(all_ids), 0)
        self._prior = None
        if self.transitions is not None:
            self.transitions = self.transitions.moved(old.numpy(), len(all_ids))
        self.withdrawn = _moved(self.withdrawn, old, len(all_ids), False)
        self.index, self.titles = index, titles_all
        self.model.item_codes = codes_all
        if self.neighbors is not None:
            lists = _moved(torch.where(self.neighbors >= 0, old[self.neighbors.long().clamp(min=0)], -1),
                           old, len(all_ids), -1)
            self.neighbors = insert_items(self._digit_tables(), codes_all, lists, to_row[n_old:],
                                          ~self.withdrawn).to(torch.int32)
        self._decoders.clear()

    def withdraw(self, item_ids: np.ndarray) -> None:
        """Take items out: never answered again, out of every graph list (the lists refilled exactly)."""
        from rpg_dist.graph.update import remove_items

        self._check_local_graph()
        rows = torch.from_numpy(self.index.rows(item_ids, what="withdrawn items"))
        self.withdrawn[rows] = True
        self.popularity[rows] = -1  # never a popular start (and a prior of 0: never answered anyway)
        self._prior = None
        if self.neighbors is not None:
            self.neighbors = remove_items(self._digit_tables(), self.model.item_codes, self.neighbors, rows,
                                          ~self.withdrawn).to(torch.int32)
        self._decoders.clear()

    def _check_local_graph(self) -> None:
        if self.shards is not None:
            raise DataError("catalogue changes need the graph in this process; this recommender decodes over "
                            "graph shards, which serve the built graph as it is")

    def _digit_tables(self) -> torch.Tensor:
        from rpg_dist.graph.similarity import digit_similarity_tables

        if self._tables is None:
            self._tables = digit_similarity_tables(self.model.token_embeddings)
        return self._tables

    def _decoder(self, beams: int) -> GraphDecoder | ShardedGraphDecoder:
        if self.shards is not None:
            return ShardedGraphDecoder(*self.shards, beams, self.decode_cfg.steps)
        if beams not in self._decoders:
            self._decoders[beams] = GraphDecoder(self.model.item_codes, self.neighbors, beams,
                                                 self.decode_cfg.steps, self.decode_cfg.chunk_size,
                                                 prior=self.item_prior())
        return self._decoders[beams]

    def _batch(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) dense rows of the last ``max_seq_len`` items of each history."""
        if not histories or any(len(h) == 0 for h in histories):
            raise DataError("every history needs at least one item id")
        trimmed = [h[-self.max_seq_len :] for h in histories]
        lengths = np.array([len(h) for h in trimmed])
        rows = self.index.rows([i for h in trimmed for i in h], what="history")
        return torch.from_numpy(right_pad(rows, lengths)), torch.from_numpy(lengths)


def _moved(values: torch.Tensor, old_rows: torch.Tensor, n: int, fill) -> torch.Tensor:
    """(n, ...) with ``values[i]`` at ``old_rows[i]`` and ``fill`` in the new rows."""
    out = torch.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    out[old_rows] = values
    return out


def beam_widths(need: torch.Tensor, num_beams: int, n_items: int) -> torch.Tensor:
    """(B,) beams per query: ``num_beams``, doubled until it holds the ``need`` items, at most n_items."""
    doublings = torch.ceil(torch.log2(need.double() / num_beams)).clamp(min=0)
    return torch.clamp(num_beams * torch.pow(2, doublings).long(), max=n_items)


def _keep_top(rows: torch.Tensor, scores: torch.Tensor, visited: torch.Tensor, items: torch.Tensor,
              exclude: torch.Tensor, k: torch.Tensor, banned: torch.Tensor | None = None) -> Ranked:
    """Drop each query's history items where ``exclude`` and every ``banned`` (N,) item, then keep
    its first ``k`` in rank order."""
    seen = (rows.unsqueeze(2) == items.unsqueeze(1)).any(dim=2) & exclude.unsqueeze(1)  # (B, K)
    if banned is not None:
        seen |= (rows >= 0) & banned[rows.clamp(min=0)]
    order = torch.sort(seen.to(torch.int8), dim=1, stable=True).indices  # kept first, rank order kept
    rows, scores, seen = rows.gather(1, order), scores.gather(1, order), seen.gather(1, order)
    drop = seen | (torch.arange(rows.shape[1]).unsqueeze(0) >= k.unsqueeze(1))
    width = int(k.max())
    rows = torch.where(drop, -1, rows)[:, :width]
    scores = torch.where(drop, float("-inf"), scores)[:, :width]
    return Ranked(rows, scores, visited)


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
