"""Catalogue changes on a trained run: items added with the trained tokenizer, items withdrawn,
persisted as versions that a restart replays exactly, a crash mid-change harmless."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rpg_dist import catalogue, failpoints
from rpg_dist.recommend import Recommender

from test_graph_update import assert_top_lists, dense_similarity

RPG = str(Path(sys.executable).parent / "rpg-dist")
NEW = {
    "item_id": [5001, 5002, 5003, 7],
    "text": ["Belus eco-friendly pink rake, 3-pack. Belus. Garden, Tools, rake.",
             "Vexeon red gel pen set, small. Vexeon. Office Products, Writing, gel pen set.",
             "Acme wooden puzzle, 500 pieces. Acme. Toys & Games, Puzzles, jigsaw puzzle.",
             "Dorix classic blue yoga mat. Dorix. Sports & Outdoors, Fitness, yoga mat."],
    "title": ["New rake", "New pens", None, "New mat"],
}


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(tiny_run[1], copy)
    return copy


def _new_items(path: Path, **columns) -> str:
    data = {**{k: v[:3] for k, v in NEW.items()}, **columns}
    pq.write_table(pa.table(data), path)
    return str(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RPG, *args], capture_output=True, text=True, timeout=300)


def _check_graph(recommender: Recommender) -> None:
    """Every offered item's list is its top-k among the offered items, by the paper's definition."""
    sims = dense_similarity(recommender.model.token_embeddings.detach(), recommender.model.item_codes)
    allowed = ~recommender.withdrawn
    assert_top_lists(recommender.neighbors.long(), sims, allowed, torch.nonzero(allowed).squeeze(1))


@pytest.mark.slow
def test_added_items_get_exact_lists_and_are_reachable(run_copy, tmp_path):
    out = _cli("add-items", "--run", run_copy, "--items", _new_items(tmp_path / "new.parquet"))
    assert out.returncode == 0, out.stderr[-2000:]
    recommender = Recommender.load(run_copy, method="graph")
    assert recommender.version == 1 and len(recommender.index) == 803
    _check_graph(recommender)
    rows = recommender.index.rows(np.array([5001, 5002, 5003]))
    titles = recommender.titles[rows].tolist()
    assert titles == ["New rake", "New pens", NEW["text"][2]]
    for row in rows.tolist():
        holders = torch.nonzero((recommender.neighbors == row).any(dim=1)).squeeze(1)
        assert len(holders), "no list leads to the new item"
        # A query that wants exactly this item's tokens, started next to it: decoding finds it.
        codes = recommender.model.item_codes[row].long()
        log_probs = torch.full((1, codes.shape[0], recommender.model.codebook_size), -20.0)
        log_probs[0, torch.arange(codes.shape[0]), codes] = 0.0
        decoder = recommender._decoder(10)
        start = torch.cat([holders[:1], torch.tensor([i for i in range(12) if i not in (row, int(holders[0]))][:9])])
        found = decoder.decode(log_probs, start.unsqueeze(0))
        # Best score 0 (all its tokens); an item with the same codes ties, and a lower row wins ties.
        assert row in found.items[0].tolist() and float(found.scores[0, 0]) == 0.0


@pytest.mark.slow
def test_a_restart_serves_exactly_the_same_catalogue(run_copy):
    live = Recommender.load(run_copy, start="history", method="graph")
    encoder = catalogue.ItemEncoder(run_copy)
    ids = np.array(NEW["item_id"][:3])
    change = catalogue.Change("add", ids, encoder.codes(ids, NEW["text"][:3]), NEW["text"][:3])
    assert catalogue.change_and_commit(live, run_copy, change, live.version) == 1
    live.version = catalogue.change_and_commit(live, run_copy, catalogue.Change("withdraw", np.array([289, 31])), 1)
    restarted = Recommender.load(run_copy, start="history", method="graph")
    assert restarted.version == live.version == 2
    assert np.array_equal(restarted.index.item_ids, live.index.item_ids)
    for name in ("neighbors", "withdrawn", "popularity"):
        assert torch.equal(getattr(restarted, name), getattr(live, name)), name
    assert torch.equal(restarted.model.item_codes, live.model.item_codes)
    histories = [[5001], [5, 17, 300], [5002, 44]]
    assert ([[r.item_id for r in recs] for recs in restarted.recommend(histories, k=5)]
            == [[r.item_id for r in recs] for recs in live.recommend(histories, k=5)])
    _check_graph(restarted)


@pytest.mark.slow
def test_withdrawn_items_are_never_recommended(run_copy):
    recommender = Recommender.load(run_copy, start="history", method="graph")
    histories = [[5, 17, 300], [44], [120, 121]]
    before = {r.item_id for recs in recommender.recommend(histories, k=8) for r in recs}
    version = catalogue.change_and_commit(recommender, run_copy, catalogue.Change("withdraw", np.array(sorted(before))), 0)
    assert version == 1
    for full in (False, True):
        answers = recommender.recommend(histories, k=8, full_ranking=full)
        assert all(len(recs) == 8 for recs in answers)
        assert not before & {r.item_id for recs in answers for r in recs}
    assert not torch.isin(recommender.neighbors, torch.from_numpy(recommender.index.rows(np.array(sorted(before))))).any()
    _check_graph(recommender)


@pytest.mark.slow
def test_a_crash_between_a_change_and_its_commit_keeps_the_previous_version(run_copy, tmp_path):
    items = _new_items(tmp_path / "new.parquet")
    failpoints.arm("catalogue-change-written")
    crashed = _cli("add-items", "--run", run_copy, "--items", items)
    assert crashed.returncode == -9 and failpoints.fired("catalogue-change-written")
    assert catalogue.current(run_copy)["version"] == 0
    assert len(Recommender.load(run_copy).index) == 800
    again = _cli("add-items", "--run", run_copy, "--items", items)
    assert again.returncode == 0, again.stderr[-2000:]
    assert catalogue.current(run_copy)["version"] == 1 and len(Recommender.load(run_copy).index) == 803


@pytest.mark.slow
def test_bad_new_items_are_clear_errors_and_change_nothing(run_copy, tmp_path):
    cases = {
        "no_text": ({"text": None}, "field 'text'"),
        "existing": ({"item_id": [5001, 5, 5003]}, "item_id 5 is already in the catalogue"),
        "repeated": ({"item_id": [5001, 5001, 5003]}, "item_id 5001 appears twice"),
        "null_text": ({"text": ["a rake", None, "a pen"]}, "row 1: field 'text' is null"),
    }
    for name, (columns, message) in cases.items():
        data = {**{k: v[:3] for k, v in NEW.items()}, **columns}
        if columns.get("text", "") is None:
            del data["text"]
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table(data), path)
        out = _cli("add-items", "--run", run_copy, "--items", str(path))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, (name, out.stderr[-800:])
    out = _cli("withdraw-items", "--run", run_copy, "--ids", "5,99999")
    assert out.returncode == 2 and "99999 is not in the catalogue" in out.stderr
    assert catalogue.current(run_copy)["version"] == 0


def test_the_transition_prior_answers_like_its_twin_before_and_after_added_items(run_copy):
    """decode.transition_weight in `recommend`: full ranking equals scoring every item with the
    prior (test_transitions' twin over item ids), and the counts follow items when rows move."""
    import yaml

    from rpg_dist.config import read_run_config
    from rpg_dist.data.dataset import read_sequences
    from rpg_dist.data.splits import leave_one_out
    from rpg_dist.decode.scoring import item_scores

    from test_transitions import twin_successors

    config = Path(run_copy) / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw.setdefault("decode", {})["transition_weight"] = 1.5
    config.write_text(yaml.safe_dump(raw))
    train = leave_one_out(read_sequences(read_run_config(run_copy).dataset), max_len=50).train.to_pylist()
    successors = twin_successors(train, 100)  # by item id
    histories = [s[:3] for s in train[:12] if len(s) >= 3]

    def twin(recommender: Recommender) -> list[list[int]]:
        items, lengths = recommender._batch(histories)
        with torch.no_grad():
            scores = item_scores(recommender.model.next_token_log_probs(items, lengths), recommender.model.item_codes)
        ids = recommender.index.item_ids
        out = []
        for history, row_scores in zip(histories, scores):
            for item, bonus in successors.get(history[-1], []):
                row = int(recommender.index.rows(np.array([item]))[0])
                row_scores[row] = row_scores[row] + 1.5 * torch.tensor(bonus, dtype=torch.float32)
            out.append([int(ids[j]) for j in sorted(range(len(ids)), key=lambda j: (-float(row_scores[j]), j))[:10]])
        return out

    recommender = Recommender.load(run_copy, method="full")
    assert recommender.transitions is not None
    got = [[r.item_id for r in recs] for recs in recommender.recommend(histories, k=10, full_ranking=True)]
    assert got == twin(recommender)
    assert 0 not in set(recommender.index.item_ids.tolist())  # a new lowest id: every row moves
    recommender.add_items(np.array([0, 6001]), np.zeros((2, recommender.model.item_codes.shape[1]), np.int16),
                          ["first", "last"])
    got = [[r.item_id for r in recs] for recs in recommender.recommend(histories, k=10, full_ranking=True)]
    assert got == twin(recommender)


@pytest.mark.parametrize("method", ["full", "graph"])
def test_the_popularity_prior_answers_like_its_twin_before_and_after_catalogue_changes(run_copy, method):
    """decode.popularity_weight in `recommend`: full ranking equals scoring every item plus w * log(1 +
    its training occurrences, counted here by item id), graph decoding returns items in that score's
    order with those scores; added items count 0 occurrences, withdrawn ones are never answered."""
    import yaml

    from rpg_dist.config import read_run_config
    from rpg_dist.data.dataset import read_sequences
    from rpg_dist.data.splits import leave_one_out
    from rpg_dist.decode.scoring import item_scores

    config = Path(run_copy) / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw.setdefault("decode", {})["popularity_weight"] = 0.3
    config.write_text(yaml.safe_dump(raw))
    train = leave_one_out(read_sequences(read_run_config(run_copy).dataset), max_len=50).train.to_pylist()
    occurrences: dict[int, int] = {}
    for sequence in train:
        for item in sequence:
            occurrences[item] = occurrences.get(item, 0) + 1
    histories = [s[:3] for s in train[:12] if len(s) >= 3]

    def twin_scores(recommender: Recommender) -> torch.Tensor:
        items, lengths = recommender._batch(histories)
        with torch.no_grad():
            scores = item_scores(recommender.model.next_token_log_probs(items, lengths), recommender.model.item_codes)
        bonus = [np.float32(0.3 * np.log1p(occurrences.get(int(i), 0))) for i in recommender.index.item_ids]
        return scores + torch.tensor(bonus, dtype=torch.float32)

    def check(recommender: Recommender, banned: set[int]) -> None:
        ids, scores = recommender.index.item_ids, twin_scores(recommender)
        got = recommender.recommend(histories, k=10, full_ranking=method == "full")
        for recs, row_scores in zip(got, scores):
            answer = [r.item_id for r in recs]
            assert not banned & set(answer)
            if method == "full":
                order = sorted(range(len(ids)), key=lambda j: (-float(row_scores[j]), j))
                assert answer == [int(ids[j]) for j in order if int(ids[j]) not in banned][:10]
            rows = recommender.index.rows(np.array(answer))
            assert [r.score for r in recs] == [float(row_scores[j]) for j in rows]  # the prior's scores
            assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)

    recommender = Recommender.load(run_copy, method=method)
    assert recommender.item_prior() is not None
    check(recommender, set())
    if method == "graph":  # a graph shard (as `serve --graph sharded` starts one) computes its rows' prior itself
        from rpg_dist.decode.sharded import GraphShard

        shard = GraphShard(len(recommender.index))
        shard.load_partition(run_copy, 0, with_prior=True)
        assert len(shard.rows) and torch.equal(shard.prior, recommender.item_prior()[shard.rows])
    popular = max(occurrences, key=occurrences.get)
    recommender.add_items(np.array([0, 6001]), np.zeros((2, recommender.model.item_codes.shape[1]), np.int16),
                          ["first", "last"])
    recommender.withdraw(np.array([popular]))
    check(recommender, {popular})
