"""Metric definitions on hand-computed cases, and the evaluate stage end to end on a tiny run."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from rpg_dist import io
from rpg_dist.artifacts import RunPaths
from rpg_dist.config import config_from_dict
from rpg_dist.data.dataset import read_info, read_sequences
from rpg_dist.data.items import ItemIndex
from rpg_dist.data.splits import leave_one_out
from rpg_dist.decode.scoring import item_scores
from rpg_dist.evaluation.metrics import ranking_metrics
from rpg_dist.evaluation.stage import Queries, evaluate
from rpg_dist.graph.stage import build_graph
from rpg_dist.testing.codes import clustered_codes
from rpg_dist.model.config import ModelConfig
from rpg_dist.model.export import model_metadata, save_model, semantic_ids_fingerprint
from rpg_dist.model.rpg import RPG
from rpg_dist.tokenizer.semantic_ids import load_semantic_ids, write_semantic_ids
from test_transitions import twin_successors


def test_ranking_metrics_hand_computed():
    ranked = np.array([
        [7, 1, 2, 3, 4, 5, 6, 8, 9, 10],  # target 7 at rank 0
        [1, 2, 7, 3, 4, 5, 6, 8, 9, 10],  # rank 2
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # rank 6: only inside the top 10
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # absent
    ])
    targets = np.array([7, 7, 7, 7])
    got = ranking_metrics(ranked, targets, [5, 10])
    assert got["recall@5"] == pytest.approx(2 / 4)
    assert got["recall@10"] == pytest.approx(3 / 4)
    assert got["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    with pytest.raises(ValueError, match="fewer than k=10"):
        ranking_metrics(ranked[:, :5], targets, [10])


def test_queries_pad_histories():
    histories = pa.array([[3, 1], [4], [5, 9, 2]], pa.list_(pa.int64()))
    queries = Queries(histories=histories, targets=np.array([0, 1, 2]))
    (items, lengths, targets), (items2, lengths2, _) = list(queries.batches(2))
    assert items.tolist() == [[3, 1], [4, -1]] and lengths.tolist() == [2, 1] and targets.tolist() == [0, 1]
    assert items2.tolist() == [[5, 9, 2]] and lengths2.tolist() == [3]


def _tiny_untrained_run(run_dir: str, dataset: str, n_digit: int = 8) -> RPG:
    """A run folder with clustered semantic IDs for every item and an untrained tiny RPG (seeded
    random weights) saved with the export API; returns the model.

    The callers compare evaluation paths with each other or with brute force on the same weights,
    so the weights need not be trained.
    """
    item_ids = read_sequences(dataset).column("item_ids").combine_chunks().flatten().to_numpy()
    from rpg_dist.data.dataset import read_items

    all_ids = read_items(dataset).column("item_id").to_numpy()
    assert set(item_ids) <= set(all_ids)
    codes = clustered_codes(len(all_ids), n_digit, n_clusters=20, keep=0.6, seed=1).numpy()
    write_semantic_ids(RunPaths(run_dir).semantic_ids, all_ids, codes)
    semantic_ids = load_semantic_ids(RunPaths(run_dir).semantic_ids)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, d_ffn=64, temperature=0.1)
    model = RPG(cfg, n_digit, 256, torch.from_numpy(semantic_ids.codes))
    save_model(model.state_dict(), model_metadata(model, semantic_ids_fingerprint(semantic_ids)), run_dir)
    return model.eval()


def _cfg(run_dir: str, dataset: str, **decode):
    return config_from_dict({
        "dataset": dataset, "run_dir": run_dir,
        "model": {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ffn": 64},
        "graph": {"n_edges": 10, "n_partitions": 2},
        "decode": {"num_beams": 20, "steps": 2, **decode},
        "eval": {"batch_size": 64, "item_block_size": 128},
    })


def _brute_force_full_ranking(model: RPG, dataset: str, index: ItemIndex, split: str,
                              prior: tuple[float, int] = (0.0, 1), popularity_weight: float = 0.0
                              ) -> dict[str, float]:
    """One query at a time: score every item, argsort, find the target. ``prior``: (transition
    weight, successors kept), the counts taken from the training sequences as the definition says;
    ``popularity_weight``: w * log(1 + the item's occurrences in those sequences), counted here."""
    loo = leave_one_out(read_sequences(dataset), max_len=50)
    examples = getattr(loo, split)
    weight, max_successors = prior
    successors = twin_successors([index.rows(np.array(s)).tolist() for s in loo.train.to_pylist()], max_successors)
    occurrences = np.zeros(len(index))
    for sequence in loo.train.to_pylist():
        for item in sequence:
            occurrences[index.rows(np.array([item]))[0]] += 1
    popular = torch.tensor(np.float32(popularity_weight * np.log1p(occurrences)), dtype=torch.float32)
    ranks = []
    with torch.no_grad():
        for history, target in zip(examples.histories.to_pylist(), examples.targets.tolist()):
            rows = torch.from_numpy(index.rows(np.array(history))).unsqueeze(0)
            lp = model.next_token_log_probs(rows, torch.tensor([len(history)]))
            scores = item_scores(lp, model.item_codes)[0]
            if popularity_weight:
                scores = scores + popular
            for item, bonus in successors.get(int(rows[0, -1]), []) if weight else []:
                scores[item] = scores[item] + weight * torch.tensor(bonus, dtype=torch.float32)
            scores = scores.numpy()
            order = np.lexsort((np.arange(len(scores)), -scores))
            ranks.append(int(np.flatnonzero(order == index.rows(np.array([target]))[0])[0]))
    ranks = np.array(ranks)
    return {"recall@10": float((ranks < 10).mean()),
            "ndcg@10": float(np.where(ranks < 10, 1 / np.log2(ranks + 2.0), 0).mean())}


def test_evaluate_end_to_end(tmp_path, synth_dataset, ray_local):
    run_dir = str(tmp_path / "run")
    model = _tiny_untrained_run(run_dir, synth_dataset)
    io.write_json(RunPaths(run_dir).metrics, {"train": {"best_epoch": 3}})
    cfg = _cfg(run_dir, synth_dataset)
    build_graph(cfg)
    metrics = evaluate(cfg)
    on_disk = io.read_json(RunPaths(run_dir).metrics)
    assert on_disk["train"] == {"best_epoch": 3}  # merged, not clobbered
    for name in ("val", "test", "val_full_ranking", "test_full_ranking", "popularity"):
        assert set(on_disk[name]) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert on_disk[name] == pytest.approx(metrics[name])
    n_items = read_info(synth_dataset).n_items
    assert 20 <= metrics["test"]["n_visited_items"] <= 20 + 2 * 20 * 10
    assert metrics["timings_s"]["test_graph_decode_s"] > 0
    index = load_semantic_ids(RunPaths(run_dir).semantic_ids).index
    expected = _brute_force_full_ranking(model, synth_dataset, index, "test")
    assert metrics["test_full_ranking"]["recall@10"] == pytest.approx(expected["recall@10"])
    assert metrics["test_full_ranking"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
    # Popularity: the 10 most frequent training items, recomputed here by hand.
    loo = leave_one_out(read_sequences(synth_dataset), max_len=50)
    ids, counts = np.unique(loo.train.flatten().to_numpy(), return_counts=True)
    top = ids[np.lexsort((ids, -counts))][:10]
    expected_pop = np.isin(loo.test.targets, top).mean()
    assert metrics["popularity"]["recall@10"] == pytest.approx(expected_pop)
    assert n_items == len(index)


def test_evaluate_with_the_transition_prior_equals_brute_force(tmp_path, synth_dataset, ray_local):
    """decode.transition_weight: full ranking reranked with the training successors equals scoring
    every item with the prior; counts from any split but training would change the figures."""
    run_dir = str(tmp_path / "run")
    model = _tiny_untrained_run(run_dir, synth_dataset)
    cfg = _cfg(run_dir, synth_dataset, transition_weight=2.0, max_successors=3)
    build_graph(cfg)
    metrics = evaluate(cfg)
    index = load_semantic_ids(RunPaths(run_dir).semantic_ids).index
    for split in ("val", "test"):
        expected = _brute_force_full_ranking(model, synth_dataset, index, split, prior=(2.0, 3))
        without = _brute_force_full_ranking(model, synth_dataset, index, split)
        assert metrics[f"{split}_full_ranking"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
        assert metrics[f"{split}_full_ranking"]["recall@10"] == pytest.approx(expected["recall@10"])
        assert expected["ndcg@10"] > without["ndcg@10"]  # the prior matters on this data
    assert metrics["decode"]["transition_weight"] == 2.0


def test_evaluate_with_the_popularity_prior_equals_brute_force(tmp_path, synth_dataset, ray_local):
    """decode.popularity_weight: full ranking equals scoring every item plus w * log(1 + its training
    occurrences); sharded decoding equals in-process decoding with it; the transition prior on top."""
    run_dir = str(tmp_path / "run")
    model = _tiny_untrained_run(run_dir, synth_dataset)
    build_graph(_cfg(run_dir, synth_dataset))
    metrics = evaluate(_cfg(run_dir, synth_dataset, popularity_weight=0.05))
    index = load_semantic_ids(RunPaths(run_dir).semantic_ids).index
    for split in ("val", "test"):
        expected = _brute_force_full_ranking(model, synth_dataset, index, split, popularity_weight=0.05)
        without = _brute_force_full_ranking(model, synth_dataset, index, split)
        assert metrics[f"{split}_full_ranking"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
        assert metrics[f"{split}_full_ranking"]["recall@10"] == pytest.approx(expected["recall@10"])
        assert expected["ndcg@10"] != without["ndcg@10"]  # the prior matters on this data
    sharded = evaluate(_cfg(run_dir, synth_dataset, popularity_weight=0.05, sharded=True))
    for split in ("val", "test"):
        for key in ("recall@10", "ndcg@10", "n_visited_items"):
            assert sharded[split][key] == metrics[split][key]
    both = evaluate(_cfg(run_dir, synth_dataset, popularity_weight=0.05, transition_weight=2.0, max_successors=3))
    expected = _brute_force_full_ranking(model, synth_dataset, index, "test", prior=(2.0, 3), popularity_weight=0.05)
    assert both["test_full_ranking"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])


@pytest.mark.parametrize("transition_weight,popularity_weight", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.05)])
def test_graph_decoding_with_every_item_in_the_beam_equals_full_ranking(tmp_path, synth_dataset, ray_local,
                                                                         transition_weight, popularity_weight):
    # b = N: the beam holds the whole catalogue, so decoding must rank exactly like full ranking.
    run_dir = str(tmp_path / "run")
    _tiny_untrained_run(run_dir, synth_dataset)
    n_items = read_info(synth_dataset).n_items
    cfg = _cfg(run_dir, synth_dataset, num_beams=n_items, steps=1, batch_size=64,
               transition_weight=transition_weight, popularity_weight=popularity_weight)
    build_graph(cfg)
    metrics = evaluate(cfg)
    for split in ("val", "test"):
        graph = {k: v for k, v in metrics[split].items() if k.startswith(("recall", "ndcg"))}
        full = {k: v for k, v in metrics[f"{split}_full_ranking"].items() if k.startswith(("recall", "ndcg"))}
        assert graph == full
        # The prior's successors count as visited too (an upper bound on distinct items).
        visited = metrics[split]["n_visited_items"]
        assert visited == n_items if not transition_weight else visited > n_items


def test_evaluate_sharded_equals_in_process(tmp_path, synth_dataset, ray_local):
    run_dir = str(tmp_path / "run")
    _tiny_untrained_run(run_dir, synth_dataset)
    cfg = _cfg(run_dir, synth_dataset)
    build_graph(cfg)
    local = evaluate(cfg)
    sharded = evaluate(_cfg(run_dir, synth_dataset, sharded=True))
    for split in ("val", "test"):
        for key in ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "n_visited_items"):
            assert sharded[split][key] == local[split][key]
        steps = sharded[split]["sharded_step_stats"]
        assert [s["step"] for s in steps] == [0, 1, 2] and all(s["bytes"] > 0 for s in steps)
        assert "sharded_step_stats" not in local[split]
