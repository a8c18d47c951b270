"""kiln.safejson: the one parser for user JSON (depth, numbers, duplicates, surrogates)."""

from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import safejson
from kiln.safejson import MAX_DEPTH, InvalidJson, InvalidNumber, JsonTooDeep

#: Valid JSON values without non-finite numbers, lone surrogates or NUL characters.
_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=30,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def _nest(openers: list[str], inner: str = "1") -> str:
    """A document nested once per opener: '[' for an array, '{' for an object."""
    heads = {"[": "[", "{": '{"k": '}
    tails = {"[": "]", "{": "}"}
    return "".join(heads[o] for o in openers) + inner + "".join(tails[o] for o in reversed(openers))


@given(_values)
def test_every_valid_document_parses_as_the_standard_library_does(value):
    text = json.dumps(value)
    if _depth(value) > MAX_DEPTH:
        with pytest.raises(JsonTooDeep):
            safejson.loads(text)
    else:
        assert safejson.loads(text) == json.loads(text)
        assert safejson.loads(text.encode()) == json.loads(text)


@given(st.lists(st.sampled_from("[{"), min_size=1, max_size=3 * MAX_DEPTH))
def test_nesting_is_refused_exactly_past_the_limit(openers):
    text = _nest(openers)
    if len(openers) <= MAX_DEPTH:
        assert safejson.loads(text) == json.loads(text)
    else:
        with pytest.raises(JsonTooDeep) as refused:
            safejson.loads(text)
        assert refused.value.status == 400
        assert refused.value.code == "json_too_deep"


@pytest.mark.parametrize("depth", [1_000, 50_000, 100_000, 1_000_000])
@pytest.mark.parametrize("opener", ["[", "{"])
def test_documents_far_deeper_than_the_recursion_limit_are_refused_not_crashed(depth, opener):
    assert depth > sys.getrecursionlimit() or depth == 1_000
    with pytest.raises(JsonTooDeep):
        safejson.loads(_nest([opener] * depth))
    with pytest.raises(JsonTooDeep):  # unterminated: the scan refuses before any parse
        safejson.loads(opener * depth)


@given(st.text(alphabet='[]{}"\\ab', max_size=200))
def test_brackets_inside_strings_do_not_count(inner):
    text = json.dumps([json.dumps(inner) * 3, {"[[[[": inner}])
    assert safejson.loads(text) == json.loads(text)


@given(st.text(max_size=200))
def test_arbitrary_text_is_parsed_or_refused_with_a_kiln_error(text):
    with contextlib.suppress(InvalidJson, InvalidNumber):
        safejson.loads(text)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1" * 400])
@given(path=st.lists(st.sampled_from(["a", "b", 0]), max_size=5))
@settings(max_examples=20)
def test_a_refused_number_is_named_by_its_location(literal, path):
    text, loc = literal, []
    for step in reversed(path):
        text = f'{{"{step}": {text}}}' if isinstance(step, str) else f"[{text}]"
    for step in path:
        loc.append(str(step))
    with pytest.raises(InvalidNumber) as refused:
        safejson.loads(text, "the body", ("body",))
    error = refused.value
    assert (error.status, error.code) == (422, "invalid_number")
    assert error.details[0]["loc"] == ["body", *loc]
    assert "must be" in error.details[0]["msg"]


def test_every_refused_number_is_listed_in_document_order():
    with pytest.raises(InvalidNumber) as refused:
        safejson.loads('{"lr": NaN, "x": [1, Infinity, 2.5], "y": 1e309}')
    assert [d["loc"] for d in refused.value.details] == [["lr"], ["x", "1"], ["y"]]
    assert refused.value.message == "lr: must be a finite number, not NaN"


def test_large_but_representable_numbers_parse():
    assert safejson.loads("[1e308, -1e308, 5e-324]") == [1e308, -1e308, 5e-324]
    assert safejson.loads("1" * safejson.MAX_INT_DIGITS) == int("1" * safejson.MAX_INT_DIGITS)


def test_a_number_with_more_digits_than_python_parses_is_refused_cleanly():
    with pytest.raises(InvalidNumber, match="at most 300 digits"):
        safejson.loads("1" * 5000)


def test_a_duplicate_key_is_refused_at_any_depth():
    with pytest.raises(InvalidJson, match="'a' appears twice"):
        safejson.loads('{"a": 1, "a": 2}')
    with pytest.raises(InvalidJson, match="'k' appears twice"):
        safejson.loads('[{"x": {"k": 1, "j": 2, "k": 1}}]')


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "x\\ud83d", "\\ude00\\ud83d"])
def test_a_lone_surrogate_is_refused(escape):
    with pytest.raises(InvalidJson, match="surrogate"):
        safejson.loads(f'{{"message": "{escape}"}}')


def test_a_surrogate_pair_and_an_escaped_backslash_are_fine():
    assert safejson.loads('["\\ud83d\\ude00", "\\\\ud800"]') == ["\U0001f600", "\\ud800"]


@pytest.mark.parametrize(
    "data", [b"\xff\xfe{}", b'{"a": "\xed\xa0\x80"}', "\ufeff{}", "{'a': 1}", "{1: 2}", ""]
)
def test_text_that_is_not_utf8_json_is_refused(data):
    with pytest.raises(InvalidJson):
        safejson.loads(data)


def test_finite_floats_keep_their_value():
    assert math.isclose(safejson.loads("0.1"), 0.1)
    assert safejson.loads("-0.0") == 0.0


def test_a_nul_character_in_a_string_is_refused():
    with pytest.raises(InvalidJson, match="NUL"):
        safejson.loads('{"name": "a\\u0000b"}')
    with pytest.raises(InvalidJson, match="NUL"):
        safejson.loads('{"a\\u0000": 1}')
    assert safejson.loads('["a\\\\u0000b"]') == ["a\\u0000b"]  # an escaped backslash


@given(_values, st.sampled_from([0, 2, 4]))
def test_the_vectorised_depth_is_the_documents_depth(value, indent):
    text = json.dumps(value, indent=indent or None, ensure_ascii=bool(indent % 4))
    assert safejson._max_depth(text) == _depth(value)


def test_the_depth_scan_carries_its_state_across_chunks(monkeypatch):
    monkeypatch.setattr(safejson, "_SCAN_CHUNK", 3)
    text = json.dumps({"a": ["[[", {"b": [[1], '\\"]]'], "c": "{{{"}]})
    assert safejson._max_depth(text) == 5
