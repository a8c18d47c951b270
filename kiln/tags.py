"""Job tags: what a tag may hold, and the `key:value` filter syntax of GET /jobs?tag=.

A job carries at most MAX_TAGS key-value pairs, given once at submission. Keys start with a
letter or digit and hold letters, digits and `_ . - /`; values also allow `: @ +`. Neither
holds spaces, so a tag reads the same in a URL, a shell and a CSV. A key has no `:`,
which is what lets a filter `team:nlp` split at its first colon.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

MAX_TAGS = 16
MAX_KEY = 64
MAX_VALUE = 128
KEY_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.\-/]{{0,{MAX_KEY - 1}}}$"
VALUE_PATTERN = rf"^[A-Za-z0-9_.\-/:@+]{{1,{MAX_VALUE}}}$"

TagKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY, pattern=KEY_PATTERN)]
TagValue = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_VALUE, pattern=VALUE_PATTERN)
]


def parse_filter(text: str) -> tuple[str, str | None]:
    """A filter `key:value` (that tag exactly) or `key` (any value) as (key, value or None);
    ValueError saying what is wrong."""
    key, sep, value = text.partition(":")
    if not re.fullmatch(KEY_PATTERN, key):
        raise ValueError(
            f"tag filter {text!r}: the key must be 1 to {MAX_KEY} letters, digits or _ . - / "
            "(starting with a letter or digit)"
        )
    if sep and not re.fullmatch(VALUE_PATTERN, value):
        raise ValueError(
            f"tag filter {text!r}: the value must be 1 to {MAX_VALUE} letters, digits "
            "or _ . - / : @ +"
        )
    return key, value if sep else None
