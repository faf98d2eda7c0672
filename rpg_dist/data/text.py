"""Item text for the encoder: the reference code's metadata fields, cleaned, one sentence per field.

The fields and their order are the reference's (``_extract_meta_sentences`` in RPG_KDD2025's
genrec/datasets/AmazonReviews2014/dataset.py: title, price, brand, feature, categories, description);
each importer passes those its data holds (s3rec: title, brand, categories). A field's sentence is
its cleaned text, list entries (category paths flattened) comma-joined, with a period added unless it
ends in . ! or ?; empty and placeholder fields ("Unknown", "none", ...) are left out.

We deliberately part from the reference's ``_sent_process`` and ``clean_text`` (genrec/utils.py)
where they garble or pad the text the encoder reads:

- it cuts the last letter of every category (``clean_text(v)[:-1]``: "Makeup" -> "Makeu"), a bug;
- it concatenates plain-list entries (``feature``) with no separator, fusing their edge words;
- it ends only price and categories with a period, so title, brand and description run on into the
  next field;
- it keeps placeholders (20 of Beauty's 12,101 items have the brand "Unknown");
- it removes tags without a space (joining the words around them) and turns every non-ASCII
  character into a space ("café" -> "caf "); we leave non-ASCII text to the encoder's tokenizer.
"""

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


# Control characters (tab, newline and carriage return are whitespace, not these): a NUL or an escape
# in item text is corrupt input, not something the encoder should read.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
CONTROL_PATTERN = _CONTROL.pattern


def problem(value: Any) -> str | None:
    """Why ``value`` cannot be item text (None when it can): an object, bytes, or control characters.

    Text fields hold strings, numbers, or lists of those (category paths)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    if isinstance(value, str):
        found = _CONTROL.search(value)
        return None if found is None else f"holds the control character {found.group()!r} at position {found.start()}"
    if isinstance(value, (list, tuple)):
        return next((p for p in map(problem, value) if p), None)
    return f"is {type(value).__name__} {str(value)[:40]!r}, not text"


def clean(value: Any) -> str:
    """Unescape HTML, tags to spaces, whitespace collapsed (none before punctuation); '' for placeholders."""
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
    """One sentence per field value, in the order given, space-joined; empty fields are left out."""
    return " ".join(s for s in (sentence(v) for v in fields) if s)
