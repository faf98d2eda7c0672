"""The service's HTTP JSON API, without Ray: request parsing and validation, answers, errors.

    POST /recommend  {"history": [item_id, ...], "k": 10, "exclude_history": true}
                     -> {"items": [{"item_id", "score", "title"}, ...], "n_visited_items": n}
    POST /recommend  {"histories": [[...], [...]], "k": 10, "exclude_history": true}
                     -> {"results": [{"items": [...], "n_visited_items": n}, ...]}
    GET  /healthz    -> {"status": "ok"}
    GET  /info       -> run, catalogue size, graph version, config digest, limits

Every bad request is a 4xx whose JSON body names the field: ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from rpg_dist.data.items import ItemIndex, repeats

RECOMMEND_KEYS = ("history", "histories", "k", "exclude_history")
ITEM_KEYS = ("item_id", "text", "title", "embedding")
INT64_MAX = 2**63 - 1


class RequestError(Exception):
    """A request the service refuses: HTTP ``status``, the offending ``field`` and why."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field}


@dataclass
class RecommendRequest:
    """One request's histories: the last ``max_seq_len`` item ids of each, all known to the catalogue."""

    item_ids: np.ndarray  # (sum of lengths,) int64, histories one after another
    lengths: np.ndarray  # (H,) int64
    k: int
    exclude_history: bool
    many: bool  # sent as "histories": answer with a list of results


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_histories: int
    max_history_len: int
    max_k: int


def parse_json(body: bytes) -> object:
    """The request body as JSON (strict: no NaN or Infinity)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, "body", f"not UTF-8 (byte {err.start})") from None
    if not text.strip():
        raise RequestError(400, "body", "empty body; expected a JSON object")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise RequestError(400, "body", f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def parse_recommend(payload: object, index: ItemIndex, max_seq_len: int, limits: Limits) -> RecommendRequest:
    """Validate a /recommend payload (every item id must be in ``index``).

    Raises:
        RequestError: 400 naming the field (``history[3]``, ``k``, ...) of the first problem.
    """
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"expected a JSON object, got {_kind(payload)}")
    unknown = sorted(set(payload) - set(RECOMMEND_KEYS))
    if unknown:
        raise RequestError(400, unknown[0], f"unknown field {unknown[0]!r}; valid fields are {list(RECOMMEND_KEYS)}")
    if ("history" in payload) == ("histories" in payload):
        raise RequestError(400, "history", "send exactly one of 'history' (a list of item ids) or 'histories'")
    many = "histories" in payload
    histories = payload["histories"] if many else [payload["history"]]
    if many and (not isinstance(histories, list) or not histories):
        raise RequestError(400, "histories", "expected a non-empty list of histories")
    if len(histories) > limits.max_histories:
        raise RequestError(400, "histories", f"{len(histories)} histories; at most {limits.max_histories} per request")
    largest = min(limits.max_k, len(index))
    k = _whole(payload.get("k", min(10, largest)), "k", 1, largest)
    exclude = payload.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise RequestError(400, "exclude_history", f"expected true or false, got {_kind(exclude)}")
    names = [f"histories[{i}]" for i in range(len(histories))] if many else ["history"]
    ids = [_history_ids(h, name, limits.max_history_len) for h, name in zip(histories, names)]
    sizes = np.array([len(h) for h in ids], dtype=np.int64)
    ends = np.cumsum(sizes)
    flat = np.concatenate(ids)
    _, known = index.find(flat)  # every id is checked, also those before the last max_seq_len
    if not known.all():
        bad = int(np.flatnonzero(~known)[0])
        query = int(np.searchsorted(ends, bad, side="right"))
        position = bad - int(ends[query] - sizes[query])
        raise RequestError(400, f"{names[query]}[{position}]", f"item id {int(flat[bad])} is not in the catalogue")
    lengths = np.minimum(sizes, max_seq_len)
    keep = np.arange(len(flat)) >= np.repeat(ends - lengths, sizes)  # the last max_seq_len of each
    return RecommendRequest(item_ids=flat[keep], lengths=lengths, k=k, exclude_history=exclude, many=many)


@dataclass
class NewItems:
    """A POST /items payload: ids, texts or vectors, display titles."""

    item_ids: np.ndarray  # (n,) int64
    texts: list[str] | None
    vectors: np.ndarray | None  # (n, D) float32
    titles: list[str]


def parse_items(payload: object, index: ItemIndex, needs_vectors: bool, max_items: int) -> NewItems:
    """Validate ``{"items": [{"item_id", "text" | "embedding", "title"?}, ...]}``.

    Raises:
        RequestError: 400 naming the field (``items[2].text``); 409 for an id already in the catalogue.
    """
    if not isinstance(payload, dict) or set(payload) != {"items"}:
        raise RequestError(400, "items", "expected {\"items\": [{\"item_id\": ..., \"text\": ...}, ...]}")
    items = payload["items"]
    if not isinstance(items, list) or not 1 <= len(items) <= max_items:
        raise RequestError(400, "items", f"expected a list of 1..{max_items} items")
    field = "embedding" if needs_vectors else "text"
    ids, values, titles = [], [], []
    for i, item in enumerate(items):
        name = f"items[{i}]"
        if not isinstance(item, dict):
            raise RequestError(400, name, f"expected an object, got {_kind(item)}")
        unknown = sorted(set(item) - set(ITEM_KEYS))
        if unknown:
            raise RequestError(400, f"{name}.{unknown[0]}", f"unknown field; valid fields are {list(ITEM_KEYS)}")
        item_id = item.get("item_id")
        if type(item_id) is not int or not -INT64_MAX - 1 <= item_id <= INT64_MAX:
            raise RequestError(400, f"{name}.item_id", f"{json.dumps(item_id)} is not an item id (a 64-bit integer)")
        values.append(_item_value(item.get(field), f"{name}.{field}", field))
        title = item.get("title", values[-1] if field == "text" else str(item_id))
        if not isinstance(title, str):
            raise RequestError(400, f"{name}.title", f"expected a string, got {_kind(title)}")
        ids.append(item_id)
        titles.append(title)
    item_ids = np.array(ids, dtype=np.int64)
    _, known = index.find(item_ids)
    if known.any():
        row = int(np.flatnonzero(known)[0])
        raise RequestError(409, f"items[{row}].item_id", f"item {ids[row]} is already in the catalogue")
    repeated = repeats(item_ids)
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise RequestError(400, f"items[{row}].item_id", f"item {ids[row]} appears twice")
    if field == "text":
        return NewItems(item_ids, values, None, titles)
    if len({len(v) for v in values}) > 1:
        raise RequestError(400, "items", "every embedding must have the same length")
    return NewItems(item_ids, None, np.array(values, dtype=np.float32), titles)


def parse_item_id(text: str) -> int:
    """The ``{id}`` of ``/items/{id}``."""
    try:
        value = int(text)
    except ValueError:
        raise RequestError(400, "item_id", f"{text!r} is not an item id (a 64-bit integer)") from None
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise RequestError(400, "item_id", f"{text} is not an item id (a 64-bit integer)")
    return value


def _item_value(value: object, name: str, field: str):
    if field == "text":
        if not isinstance(value, str) or not value.strip():
            raise RequestError(400, name, "expected a non-empty string (the item's text, as the dataset's)")
        return value
    if not isinstance(value, list) or not value or any(type(v) not in (int, float) for v in value):
        raise RequestError(400, name, "expected a list of numbers (this run was tokenized from vectors)")
    return value


def answer(item_ids: np.ndarray, scores: np.ndarray, titles: list[str], n_visited: int) -> dict:
    """One history's answer: its items best first (``item_ids`` and ``scores`` already trimmed)."""
    items = [{"item_id": i, "score": s, "title": t} for i, s, t in zip(item_ids.tolist(), scores.tolist(), titles)]
    return {"items": items, "n_visited_items": n_visited}


def _history_ids(history: object, name: str, max_len: int) -> np.ndarray:
    if not isinstance(history, list):
        raise RequestError(400, name, f"expected a list of item ids, got {_kind(history)}")
    if not history:
        raise RequestError(400, name, "empty history; send at least one item id")
    if len(history) > max_len:
        raise RequestError(400, name, f"{len(history)} item ids; at most {max_len} per history")
    bad = next((i for i, v in enumerate(history) if type(v) is not int or not -INT64_MAX - 1 <= v <= INT64_MAX), None)
    if bad is not None:
        raise RequestError(400, f"{name}[{bad}]", f"{json.dumps(history[bad])} is not an item id (a 64-bit integer)")
    return np.asarray(history, dtype=np.int64)


def _whole(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise RequestError(400, name, f"expected a whole number, got {_kind(value)}")
    if not low <= value <= high:
        raise RequestError(400, name, f"{value} is outside {low}..{high}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> None:
    raise RequestError(400, "body", f"{name} is not valid JSON")
