"""Server-Sent Events (the `text/event-stream` format): writing one event, and reading a
stream of them back incrementally.

The web writes job streams with `format_event` and `format_comment`; `kiln.Client.follow`
reads them with `Parser`. Only the parts of the format Kiln uses are kept: `id`, `event`,
`data` (JSON, one line), `retry`, and comments; the parser follows the WHATWG rules for
the rest so that any conforming stream reads back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: The media type of a stream.
MEDIA_TYPE = "text/event-stream"

_LINE_END = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class Event:
    """One dispatched event: its type (`message` when unnamed), data and last event id."""

    event: str
    data: str
    id: str

    def json(self) -> Any:
        return json.loads(self.data)


def format_event(data: dict[str, Any], *, event: str, id: str | None = None) -> bytes:
    """One event, its data as one line of compact JSON (JSON never holds a raw newline)."""
    lines = []
    if id is not None:
        _check_field(id)
        lines.append(f"id: {id}")
    _check_field(event)
    lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), allow_nan=False))
    return ("\n".join(lines) + "\n\n").encode()


def format_comment(text: str = "") -> bytes:
    """A comment line: clients ignore it; it keeps proxies and idle sockets alive."""
    _check_field(text)
    return f": {text}\n\n".encode()


def format_retry(milliseconds: int) -> bytes:
    """Tell an EventSource how long to wait before reconnecting."""
    return f"retry: {int(milliseconds)}\n\n".encode()


def _check_field(value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError("an SSE field may not hold a line break or NUL")


class Parser:
    """Feed bytes as they arrive; get back the events each feed completed.

    `last_event_id` is the id a reconnect sends as `Last-Event-ID`, and `retry_ms` the
    reconnection delay the server asked for, if any.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self._first = True

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while True:
            line, whole = self._next_line()
            if not whole:
                return events
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _next_line(self) -> tuple[str, bool]:
        """Split one line off the buffer at CRLF, LF or CR (a CR at the very end waits:
        its LF may be in the next chunk). False when no whole line is buffered."""
        found = _LINE_END.search(self._buffer)
        if found is None or (found.group() == b"\r" and found.end() == len(self._buffer)):
            return "", False
        text = self._buffer[: found.start()].decode("utf-8", errors="replace")
        self._buffer = self._buffer[found.end() :]
        if self._first:
            text = text.removeprefix("\ufeff")
            self._first = False
        return text, True

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return Event(event=event or "message", data="\n".join(data), id=self.last_event_id)


def events(chunks: Iterator[bytes], parser: Parser | None = None) -> Iterator[Event]:
    """The events of a byte stream, as they complete."""
    parser = parser or Parser()
    for chunk in chunks:
        yield from parser.feed(chunk)
