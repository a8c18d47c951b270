"""The one parser for JSON that users send: request bodies, form fields, model configs and
the header inside a safetensors file.

Python's json module is recursive (a 100,000-deep array raises RecursionError, a 500 in the
web) and lenient (NaN, Infinity and 1e400 parse to floats that later become null). Here the
text is first scanned linearly for its nesting depth, so nothing recursive ever sees more
than MAX_DEPTH levels, then parsed with hooks that refuse what JSON (RFC 8259) allows to
mean different things to different readers:

- nesting deeper than MAX_DEPTH                        → 400 json_too_deep
- text that is not UTF-8, not JSON, a key twice in one
  object, a lone UTF-16 surrogate ("\\ud800") or a NUL
  ("\\u0000", which no database text column holds)     → 400 invalid_request
- NaN, Infinity, -Infinity, a float out of range (1e400)
  or an integer longer than MAX_INT_DIGITS digits       → 422 invalid_number, naming where
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from kiln.errors import InvalidRequest, KilnError

#: The deepest nesting of arrays and objects accepted anywhere a user sends JSON. Kiln's own
#: documents nest 4 levels (a schedule's spec's arch_params' hidden list); 32 leaves room
#: and stays far below Python's recursion limit and pyarrow's crash (~20,000 levels).
MAX_DEPTH = 32
#: Integers longer than this are refused: every number Kiln reads fits in a float (1.8e308),
#: and Python refuses to parse integers past 4,300 digits with a ValueError of its own.
MAX_INT_DIGITS = 300
#: At most this many refused numbers are listed in one answer.
_MAX_DETAILS = 10

#: A whole JSON string (no raw newline: JSON forbids one inside a string), or a bracket.
#: Matched left to right this tokenises valid JSON exactly; on invalid text it can only
#: count more brackets, never fewer, than a parser reaches before it fails.
_STRING = r'"[^"\\\n]*(?:\\[^\n][^"\\\n]*)*"'
_STRINGS = re.compile(_STRING)
_TOKEN = re.compile(_STRING + r"|[\[\]{}]")
#: An escape that may be a surrogate or a NUL (or an escaped backslash before "u..."):
#: only text holding one has its strings decoded one by one.
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")
_QUOTE = ord('"')
_BRACKET, _BRACE = ord("["), ord("{")
_SCAN_CHUNK = 4 * 1024 * 1024
_OPEN = frozenset("[{")


class InvalidJson(InvalidRequest):
    """Text that is not JSON Kiln accepts (400 invalid_request, as any malformed body)."""


class JsonTooDeep(InvalidJson):
    code = "json_too_deep"


class InvalidNumber(KilnError):
    status, code = 422, "invalid_number"


class _Refused:
    """Stands in for a refused number while parsing, so its location can be named."""

    __slots__ = ("reason", "text")

    def __init__(self, text: str, reason: str) -> None:
        self.text, self.reason = text, reason


def check_depth(
    text: str, limit: int = MAX_DEPTH, what: str = "the JSON", *, strings: bool = True
) -> None:
    """JsonTooDeep when arrays and objects nest deeper than `limit` (strings do not count);
    with `strings`, also InvalidJson for a string holding a lone surrogate or a NUL.
    Linear and never recursive; the regular expressions do the per-character work."""
    if strings and _SUSPECT_ESCAPE.search(text):
        for match in _STRINGS.finditer(text):
            if "\\u" in match.group():
                _check_escapes(match.group(), match.start(), what)
    if text.count("[") + text.count("{") <= limit or _max_depth(text) <= limit:
        return
    raise JsonTooDeep(
        f"{what} nests deeper than {limit} levels of arrays and objects "
        f"(at character {_too_deep_at(text, limit)})",
        [{"loc": [], "msg": f"nested deeper than {limit} levels"}],
    )


def _max_depth(text: str) -> int:
    """The deepest nesting outside strings, vectorised: escaped backslashes, then escaped
    quotes, are dropped, so each quote left opens or closes a string. On valid JSON this is
    exact; on invalid JSON it agrees with a parser up to the point where the parser fails,
    so it never finds less nesting than a parser would reach."""
    data = text.encode("utf-8", "surrogatepass")
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    chars = np.frombuffer(data, np.uint8)
    depth = deepest = quotes = 0
    for start in range(0, len(chars), _SCAN_CHUNK):
        chunk = chars[start : start + _SCAN_CHUNK]
        in_string = (np.cumsum(chunk == _QUOTE, dtype=np.int64) + quotes) & 1
        opens = (chunk == _BRACKET) | (chunk == _BRACE)
        closes = (chunk == _BRACKET + 2) | (chunk == _BRACE + 2)  # "]" and "}" follow by 2
        step = opens.astype(np.int64) - closes
        step[in_string == 1] = 0
        levels = np.cumsum(step) + depth
        deepest = max(deepest, int(levels.max()))
        depth, quotes = int(levels[-1]), int(in_string[-1])
    return deepest


def _too_deep_at(text: str, limit: int) -> int:
    """Where the nesting first passes `limit` (for the message: a refused text only)."""
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in _OPEN:
            depth += 1
            if depth > limit:
                return match.start()
        elif token[0] != '"':
            depth -= 1
    return len(text)


def _check_escapes(token: str, at: int, what: str) -> None:
    # One string at a time: json decodes the escapes exactly, without recursion.
    try:
        decoded = json.loads(token)
        decoded.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJson(
            f"{what} has a string with a lone UTF-16 surrogate escape (at character {at}); "
            "strings must be valid Unicode"
        ) from None
    except ValueError:
        return  # not a valid string: the parser says where
    if "\x00" in decoded:  # no database text column can hold it
        raise InvalidJson(f"{what} has a string with a NUL character, \\u0000 (at character {at})")


def loads(data: str | bytes, what: str = "the JSON", loc: tuple[str, ...] = ()) -> Any:
    """Parse user JSON under the rules of this module. `what` names the text in messages
    ("the body", "config"); `loc` prefixes the location of a refused number."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJson(f"{what} is not UTF-8 text (byte {exc.start})") from None
    else:
        text = data
    check_depth(text, MAX_DEPTH, what)
    refused: list[_Refused] = []
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=lambda name: _refuse(refused, name, "must be a finite number"),
            parse_float=lambda digits: _float(refused, digits),
            parse_int=lambda digits: _int(refused, digits),
        )
    except json.JSONDecodeError as exc:
        raise InvalidJson(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable after check_depth; a 500 must never come of it
        raise JsonTooDeep(f"{what} nests too deeply") from None
    if refused:
        _raise_refused(value, what, loc)
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # Parsers disagree on which of the two wins, so neither does.
                raise InvalidJson(f"key {key!r} appears twice in one object")
            seen.add(key)
    return obj


def _refuse(refused: list[_Refused], text: str, reason: str) -> _Refused:
    marker = _Refused(text, reason)
    refused.append(marker)
    return marker


def _float(refused: list[_Refused], digits: str) -> float | _Refused:
    value = float(digits)
    if math.isfinite(value):
        return value
    return _refuse(refused, digits, "must be a finite number within ±1.8e308")


def _int(refused: list[_Refused], digits: str) -> int | _Refused:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        return _refuse(refused, digits, f"must be a number of at most {MAX_INT_DIGITS} digits")
    return int(digits)


def _raise_refused(value: Any, what: str, loc: tuple[str, ...]) -> None:
    """InvalidNumber listing where the refused numbers are (depth is bounded: a loop)."""
    details: list[dict[str, Any]] = []
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, loc)]
    while stack and len(details) < _MAX_DETAILS:
        node, path = stack.pop()
        if isinstance(node, _Refused):
            shown = node.text if len(node.text) <= 20 else node.text[:17] + "..."
            details.append({"loc": list(path), "msg": f"{node.reason}, not {shown}"})
        elif isinstance(node, dict):
            stack.extend((v, (*path, k)) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, (*path, str(i))) for i, v in reversed(list(enumerate(node))))
    first = details[0]
    where = ".".join(first["loc"]) or what
    raise InvalidNumber(f"{where}: {first['msg']}", details)
