"""Job tags: what a tag may hold, and the `key:value` filter syntax of GET /jobs?tag=.

A job carries at most MAX_TAGS key-value pairs, given once at submission. Keys start with a
letter or digit and hold letters, digits and `_ . - /`; values also allow `: @ +`. Neither
holds spaces, so a tag reads the same in a URL, a shell and a CSV. A key has no `:`,
which is what lets a filter `team:nlp` split at its first colon.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

MAX_TAGS = 16
MAX_KEY = 64
MAX_VALUE = 128
KEY_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.\-/]{{0,{MAX_KEY - 1}}}$"
VALUE_PATTERN = rf"^[A-Za-z0-9_.\-/:@+]{{1,{MAX_VALUE}}}$"

KEY_RULE = f"1 to {MAX_KEY} letters, digits or _ . - / (starting with a letter or digit)"
VALUE_RULE = f"1 to {MAX_VALUE} letters, digits or _ . - / : @ +"


def _matching(pattern: str, rule: str, what: str) -> Callable[[str], str]:
    """A validator refusing what `pattern` does not match in words (`what` must be
    `rule`), not with pydantic's "String should match pattern '^[A-Za-z…'"."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{what} must be {rule}")
        return value

    return check


# The JSON schema keeps the pattern (OpenAPI, clients); the error says it in words.
TagKey = Annotated[
    str,
    AfterValidator(_matching(KEY_PATTERN, KEY_RULE, "a tag's key")),
    WithJsonSchema({"type": "string", "pattern": KEY_PATTERN, "maxLength": MAX_KEY}),
]
TagValue = Annotated[
    str,
    AfterValidator(_matching(VALUE_PATTERN, VALUE_RULE, "a tag's value")),
    WithJsonSchema({"type": "string", "pattern": VALUE_PATTERN, "maxLength": MAX_VALUE}),
]


def parse_filter(text: str) -> tuple[str, str | None]:
    """A filter `key:value` (that tag exactly) or `key` (any value) as (key, value or None);
    ValueError saying what is wrong."""
    key, sep, value = text.partition(":")
    if not re.fullmatch(KEY_PATTERN, key):
        raise ValueError(f"tag filter {text!r}: the key must be {KEY_RULE}")
    if sep and not re.fullmatch(VALUE_PATTERN, value):
        raise ValueError(f"tag filter {text!r}: the value must be {VALUE_RULE}")
    return key, value if sep else None
