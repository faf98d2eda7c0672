"""The transition prior (decode/transitions.py) against twins written from its definition:
score(j) = rpg(j) + w * log(1 + count(last -> j)) over the last item's S most frequent successors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpg_dist.decode.scoring import full_ranking_topk
from rpg_dist.decode.transitions import count_transitions, rerank


def twin_successors(sequences: list[list[int]], max_successors: int) -> dict[int, list[tuple[int, float]]]:
    """Per source item, its (successor, log(1 + count)) pairs: most frequent first, ties by lower id."""
    counts = Counter((a, b) for seq in sequences for a, b in zip(seq, seq[1:]))
    out: dict[int, list[tuple[int, float]]] = {}
    for (a, b), c in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])):
        if len(out.setdefault(a, [])) < max_successors:
            out[a].append((b, float(np.float32(math.log1p(c)))))
    return out


def as_list_array(sequences: list[list[int]]) -> pa.ListArray:
    return pa.array(sequences, pa.list_(pa.int64()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 11), min_size=0, max_size=9), min_size=1, max_size=30), st.integers(1, 5))
def test_counts_equal_a_counting_twin(sequences, max_successors):
    train = as_list_array(sequences)
    got = count_transitions(train, train.flatten().to_numpy(), 12, max_successors)
    want = twin_successors(sequences, max_successors)
    for item in range(12):
        rows, bonus = got.of(np.array([item]))
        pairs = [(int(r), float(b)) for r, b in zip(rows[0], bonus[0]) if r >= 0]
        assert pairs == want.get(item, [])


def test_counts_skip_pairs_across_sequences_and_sliced_arrays():
    train = as_list_array([[9, 9], [1, 2], [], [3], [4, 5, 4]]).slice(1)  # offsets not from 0
    got = count_transitions(train, train.flatten().to_numpy(), 10, 5)
    assert got.of(np.array([2]))[0].tolist() == [[]]
    assert got.of(np.array([1]))[0].tolist() == [[2]]
    assert got.of(np.array([5]))[0].tolist() == [[4]]
    assert int(np.diff(got.indptr).sum()) == 3  # 1->2, 4->5, 5->4; not 9->9, 2->3 or 3->4


def dense_twin(log_probs, codes, last, sequences, weight, max_successors, k):
    """Score every item from the definition (digits added in order, float32), rank, keep k."""
    succ = twin_successors(sequences, max_successors)
    out_rows, out_scores = [], []
    for b in range(log_probs.shape[0]):
        total = log_probs[b, 0][codes[:, 0].long()].clone()
        for d in range(1, codes.shape[1]):
            total += log_probs[b, d][codes[:, d].long()]
        scores = total / codes.shape[1]
        for item, bonus in succ.get(int(last[b]), []):
            scores[item] = scores[item] + weight * torch.tensor(bonus, dtype=torch.float32)
        order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]
        out_rows.append(order)
        out_scores.append([float(scores[j]) for j in order])
    return out_rows, out_scores


@pytest.mark.parametrize("seed", range(4))
def test_rerank_of_full_ranking_equals_the_dense_twin(seed):
    rng = np.random.default_rng(seed)
    n, m, v, batch, k = 60, 4, 8, 7, 10
    codes = torch.from_numpy(rng.integers(0, v, (n, m))).to(torch.int16)
    codes[5] = codes[6]  # equal codes: equal RPG scores, ties by lower row
    log_probs = torch.log_softmax(torch.from_numpy(rng.standard_normal((batch, m, v))).float(), dim=-1)
    # Popular sources with many successors, so the cap of 4 matters.
    sequences = [list(rng.choice(n, rng.integers(2, 8), p=np.r_[0.3, np.full(n - 1, 0.7 / (n - 1))]))
                 for _ in range(200)]
    last = torch.tensor([0, 0, 3, 5, 17, 59, 1])
    train = as_list_array(sequences)
    prior = count_transitions(train, train.flatten().to_numpy(), n, max_successors=4)
    rows, scores = full_ranking_topk(log_probs, codes, k)
    got_rows, got_scores = rerank(log_probs, codes, rows, scores, last, prior, 0.7, k)
    want_rows, want_scores = dense_twin(log_probs, codes, last, sequences, 0.7, 4, k)
    assert got_rows.tolist() == want_rows
    assert got_scores.tolist() == want_scores
    assert not torch.equal(got_rows, rows)  # the prior changed the ranking


def test_banned_successors_never_return_and_moved_keeps_every_pair():
    sequences = [[0, 1], [0, 2], [0, 2], [3, 0]]
    train = as_list_array(sequences)
    prior = count_transitions(train, train.flatten().to_numpy(), 4, 5)
    codes = torch.zeros(4, 2, dtype=torch.int16)
    log_probs = torch.zeros(1, 2, 4)
    banned = torch.tensor([False, False, True, False])
    rows, _ = rerank(log_probs, codes, torch.tensor([[3, 1]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0]),
                     prior, 1.0, 2, banned)
    assert rows.tolist() == [[1, 3]]  # 2 (the most frequent successor) is banned
    # Rows move as new items are dealt in: old rows 0..3 -> 0, 2, 3, 5 among 7.
    old_rows = np.array([0, 2, 3, 5])
    moved = prior.moved(old_rows, 7)
    for item in range(4):
        before_rows, before_bonus = prior.of(np.array([item]))
        after_rows, after_bonus = moved.of(np.array([old_rows[item]]))
        kept = before_rows[0] >= 0
        assert after_rows[0][after_rows[0] >= 0].tolist() == old_rows[before_rows[0][kept].numpy()].tolist()
        assert after_bonus[0][after_rows[0] >= 0].tolist() == before_bonus[0][kept].tolist()
    assert all(np.diff(moved.indptr)[[1, 4, 6]] == 0)  # the new rows have no successors
