"""kiln.sse: events written by format_event read back by Parser, however the bytes are cut."""

from __future__ import annotations

import pytest

from kiln import sse


def test_an_event_round_trips_through_the_parser() -> None:
    raw = sse.format_event({"state": "running", "n": 1}, event="state", id="4.2")
    assert raw == b'id: 4.2\nevent: state\ndata: {"state":"running","n":1}\n\n'
    parser = sse.Parser()
    [event] = parser.feed(raw)
    assert (event.event, event.id, event.json()) == ("state", "4.2", {"state": "running", "n": 1})
    assert parser.last_event_id == "4.2"


def test_events_split_anywhere_across_chunks_arrive_whole_and_in_order() -> None:
    stream = b"".join(
        [
            sse.format_retry(2000),
            sse.format_event({"a": "é\u2028"}, event="log", id="1"),
            sse.format_comment("keep-alive"),
            sse.format_event({"b": 2}, event="metric", id="2"),
        ]
    )
    for size in (1, 2, 3, 7, len(stream)):
        parser = sse.Parser()
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        events = list(sse.events(iter(chunks), parser))
        assert [(e.event, e.id, e.json()) for e in events] == [
            ("log", "1", {"a": "é\u2028"}),
            ("metric", "2", {"b": 2}),
        ]
        assert parser.retry_ms == 2000


def test_the_parser_follows_the_whatwg_rules_for_line_ends_and_fields() -> None:
    parser = sse.Parser()
    text = "\ufeffdata: one\r\ndata:two\r\rid: 7\revent: x\ndata: {}\n\n: note\nfoo: bar\n\n"
    events = parser.feed(text.encode())
    assert [(e.event, e.data, e.id) for e in events] == [
        ("message", "one\ntwo", ""),
        ("x", "{}", "7"),
    ]
    # An event without data is not dispatched; the id still counts.
    assert parser.feed(b"id: 9\n\n") == []
    assert parser.last_event_id == "9"


def test_a_cr_at_the_end_of_a_chunk_waits_for_a_possible_lf() -> None:
    parser = sse.Parser()
    assert parser.feed(b"data: 1\r") == []
    assert parser.feed(b"\n\r\n")[0].data == "1"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_fields_with_line_breaks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        sse.format_event({}, event=bad)
    with pytest.raises(ValueError, match="line break"):
        sse.format_comment(bad)
