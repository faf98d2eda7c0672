"""Leave-one-out splits and RPG's training windows, vectorised over users with numpy offsets.

Per user with items ``s[0..L)``: ``s[L-1]`` is the test target (history ``s[:L-1]``), ``s[L-2]`` the
validation target (history ``s[:L-2]``), and ``s[:L-2]`` the training sequence.

Users with fewer than 3 items are dropped from all three splits (and counted), so that no history is
empty and validation and test score the same users. The reference code's split
(``AbstractDataset._leave_one_out`` in RPG_KDD2025's genrec/dataset.py) keeps them: every user in
test, those with 2+ items in validation, though its tokenizer fails on the empty histories this
gives (an IndexError in ``RPGTokenizer._tokenize_later_items``); its 5-core data never has such users.
Neither has Beauty here (shortest sequence: 5 items): no user is dropped.

Training windows follow the reference code (``RPGTokenizer.tokenize_function``): with ``M`` the maximum
number of inputs, the first window is ``t[:min(T, M+1)]`` and labels every next item; each later
window ``t[j:j+M+1]`` (``j = 1 .. T-M-1``) slides by one and labels only its last item. Every training
item except the first is thus a label exactly once. A window is stored as its ``M+1``-or-fewer item ids
plus ``n_targets``: the number of labelled positions, counted from the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

MIN_SEQUENCE_LENGTH = 3


@dataclass
class EvalExamples:
    """Histories (truncated to the last ``max_len`` items) and their held-out targets."""

    user_ids: np.ndarray  # (n,) int64
    histories: pa.ListArray  # n lists of item ids, each 1..max_len long
    targets: np.ndarray  # (n,) int64


@dataclass
class LeaveOneOut:
    user_ids: np.ndarray  # (n,) int64 of the kept users
    train: pa.ListArray  # training sequences s[:L-2]
    val: EvalExamples
    test: EvalExamples
    n_dropped_users: int


def leave_one_out(sequences: pa.Table, max_len: int) -> LeaveOneOut:
    """Split ``(user_id, item_ids)`` rows; histories keep their last ``max_len`` items."""
    lists = _as_list_array(sequences.column("item_ids"))
    starts, lengths = _bounds(lists)
    keep = lengths >= MIN_SEQUENCE_LENGTH
    n_dropped = int((~keep).sum())
    if n_dropped:
        log.warning("dropped %d user(s) with fewer than %d items", n_dropped, MIN_SEQUENCE_LENGTH)
    values = lists.flatten().to_numpy()
    user_ids = sequences.column("user_id").to_numpy()[keep]
    starts, ends = starts[keep], starts[keep] + lengths[keep]
    train = _slice(values, starts, ends - 2)
    val = _examples(values, user_ids, starts, ends - 2, max_len)
    test = _examples(values, user_ids, starts, ends - 1, max_len)
    return LeaveOneOut(user_ids=user_ids, train=train, val=val, test=test, n_dropped_users=n_dropped)


def training_windows(train: pa.ListArray, max_len: int) -> pa.Table:
    """Training windows of at most ``max_len`` inputs: ``item_ids`` (<= max_len+1) and ``n_targets``.

    Windows come grouped by user, first window first, in input order.
    """
    train = _as_list_array(train)
    starts, lengths = _bounds(train)
    values = train.flatten().to_numpy()
    has_first = lengths >= 2
    first_len = np.minimum(lengths, max_len + 1)
    n_later = np.maximum(lengths - max_len - 1, 0)
    # One row per window: (user row, window start offset j, window length, n_targets).
    user = np.concatenate([np.flatnonzero(has_first), np.repeat(np.arange(len(lengths)), n_later)])
    offset = np.concatenate([np.zeros(has_first.sum(), np.int64), _within_group_rank(n_later) + 1])
    length = np.concatenate([first_len[has_first], np.full(n_later.sum(), max_len + 1)])
    n_targets = np.concatenate([first_len[has_first] - 1, np.ones(n_later.sum(), np.int64)])
    order = np.lexsort((offset, user))
    user, offset, length, n_targets = user[order], offset[order], length[order], n_targets[order]
    window_start = starts[user] + offset
    item_ids = _slice(values, window_start, window_start + length)
    return pa.table({"item_ids": item_ids, "n_targets": pa.array(n_targets.astype(np.int32))})


def _examples(values: np.ndarray, user_ids: np.ndarray, starts: np.ndarray, target_pos: np.ndarray, max_len: int) -> EvalExamples:
    history_start = np.maximum(starts, target_pos - max_len)
    return EvalExamples(
        user_ids=user_ids,
        histories=_slice(values, history_start, target_pos),
        targets=values[target_pos],
    )


def _slice(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.ListArray:
    """ListArray whose row i is ``values[starts[i]:ends[i]]``, built with one gather."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values[gather], pa.int64())).cast(
        pa.list_(pa.int64())
    )


def _within_group_rank(counts: np.ndarray) -> np.ndarray:
    """For groups of sizes ``counts``: 0, 1, ..., counts[g]-1 for each group, concatenated."""
    total = int(counts.sum())
    group_start = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - group_start


def _bounds(lists: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Row starts into ``lists.flatten()`` and row lengths (sliced arrays have a base offset)."""
    offsets = lists.offsets.to_numpy().astype(np.int64)
    return offsets[:-1] - offsets[0], np.diff(offsets)


def _as_list_array(column: pa.ChunkedArray | pa.Array) -> pa.ListArray:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
