"""Item text the way the RPG paper's code builds it: cleaned fields, each ending in a period."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from typing import Any

_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")
# Placeholders in raw metadata that carry no information about the item.
_EMPTY_VALUES = {"", "unknown", "none", "null", "n/a", "nan"}


def clean(value: Any) -> str:
    """Unescape HTML, drop tags, collapse whitespace; '' for placeholder values."""
    text = _SPACE.sub(" ", _TAGS.sub(" ", html.unescape(str(value)))).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return "" if text.lower() in _EMPTY_VALUES else text


def sentence(value: Any) -> str:
    """One field as a sentence: lists are comma-joined (nested category paths flattened)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        parts = []
        for entry in value:
            parts.extend(entry if isinstance(entry, (list, tuple)) else [entry])
        text = ", ".join(p for p in (clean(x).rstrip(".") for x in parts) if p)
    else:
        text = clean(value)
    if text and not text.endswith((".", "!", "?")):
        text += "."
    return text


def item_text(fields: Iterable[Any]) -> str:
    """Join field values in order (title, price, brand, feature, categories, description)."""
    return " ".join(s for s in (sentence(v) for v in fields) if s)
