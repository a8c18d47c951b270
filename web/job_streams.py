"""A job's live stream as Server-Sent Events: the generator one open stream runs, and the
process's hub and slots it shares with the others (built by `init_app`).

A stream holds one gunicorn thread while it is open, blocked on its job's feed (a
`threading.Condition`), and no database connection: the hub reads for every stream of the
process (`web/stream_hub.py`). `kiln web` sizes the threads so that the streams a process
admits (`KILN_STREAM_THREADS`) can never take the threads of ordinary requests; see
docs/architecture.md, "Live streams".
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from flask import Flask, Response, current_app

from db.job_stream import Cursor, Item, Snapshot, items, snapshot_items
from kiln import sse
from kiln.errors import KilnError, StreamsBusy, TooManyStreams
from kiln.settings import Settings
from web.errors import problem
from web.stream_hub import Feed, Hub, wait_for_change
from web.stream_slots import StreamSlots, redis_client

#: What an EventSource waits before reconnecting after a dropped connection.
RETRY_MS = 2000
#: What a client refused a stream (429, 503) is told to wait; it can poll meanwhile.
REFUSED_RETRY_AFTER_S = 10


def init_app(app: Flask, settings: Settings) -> None:
    """The process's hub (its thread starts with the first stream) and stream slots."""
    app.extensions["kiln.stream_hub"] = Hub(app.extensions["kiln.sessions"])
    app.extensions["kiln.stream_slots"] = StreamSlots(
        redis_client(settings.redis_url),
        per_key=settings.streams_per_key,
        per_process=settings.stream_threads,  # 0: no streams (503), clients poll
    )


def hub() -> Hub:
    found: Hub = current_app.extensions["kiln.stream_hub"]
    return found


def slots() -> StreamSlots:
    found: StreamSlots = current_app.extensions["kiln.stream_slots"]
    return found


def caller_digest(token: str) -> str:
    """Who a stream counts against: the API key, by digest (never in clear)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def stream(
    hub: Hub,
    job_id: str,
    cursor: Cursor,
    *,
    keepalive_s: float,
    renew: Callable[[], None] = lambda: None,
) -> Iterator[bytes]:
    """The bytes of one stream, from `cursor` until the job's final state has been sent.

    Rows come from the feed's buffer, or from the stream's own read when it is behind the
    buffer; each event's id is the stream's cursor right after it, so a client that
    reconnects with it as Last-Event-ID gets exactly the events it missed. A state or
    progress event goes out only for a snapshot read after the last one this stream sent.
    """
    yield sse.format_retry(RETRY_MS)
    reader = _Reader(hub, hub.follow(job_id), cursor)
    renewed = time.monotonic()
    try:
        while not reader.done:
            version = reader.feed.version
            yield from reader.step()
            if reader.done or reader.behind:
                continue
            if wait_for_change(reader.feed, version, keepalive_s) == version:
                # Also how a stream learns that its client left: this write fails.
                yield sse.format_comment("keep-alive")
            if time.monotonic() - renewed >= keepalive_s:
                renew()
                renewed = time.monotonic()
    finally:
        hub.leave(reader.feed)


class _Reader:
    """One stream's position on its job's feed."""

    def __init__(self, hub: Hub, feed: Feed, cursor: Cursor) -> None:
        self.hub, self.feed, self.cursor = hub, feed, cursor
        self.told_at = float("-inf")  # when the snapshot this stream last sent was read
        self.done = False
        self.behind = False

    def step(self) -> Iterator[bytes]:
        """Send what the feed (or, when behind it, the database) holds past the cursor."""
        with self.feed.changed:
            version, floor = self.feed.version, self.feed.floor
            self.behind = not self.cursor.covers(floor)
            rows = [] if self.behind else list(self.feed.rows)
            snapshot, observed_at = self.feed.snapshot, self.feed.observed_at
        if version == -1:  # the job was deleted
            self.done = True
        elif self.behind:
            yield from self._catch_up()
        else:
            for item in rows:
                moved = _advance(self.cursor, item)
                if moved is not None:
                    self.cursor = moved
                    yield _format(item, moved)
            if snapshot is not None:
                yield from self._tell(snapshot, observed_at, snapshot_items(snapshot, self.cursor))

    def _catch_up(self) -> Iterator[bytes]:
        delta, read_at = self.hub.catch_up(self.feed.job_id, self.cursor)
        if delta is None:
            self.done = True
            return
        found = items(delta, self.cursor)
        rows = [item for item in found if item.type in {"log", "metric"}]
        for item in rows:
            self.cursor = item.cursor
            yield _format(item, item.cursor)
        if delta.complete:
            told = [item for item in found if item not in rows]
            yield from self._tell(delta.snapshot, read_at, told)

    def _tell(self, snapshot: Snapshot, observed_at: float, found: list[Item]) -> Iterator[bytes]:
        """Send a snapshot's events, unless this stream sent a later reading already."""
        if observed_at <= self.told_at:
            return
        self.told_at = observed_at
        for item in found:
            self.cursor = item.cursor
            yield _format(item, item.cursor)
        self.done = snapshot.terminal and self.cursor.state == snapshot.state_key


def _advance(cursor: Cursor, item: Item) -> Cursor | None:
    """The stream's cursor past a buffered row, or None if it already had it."""
    if item.type == "log" and item.cursor.log_id > cursor.log_id:
        return replace(cursor, log_id=item.cursor.log_id)
    if item.type == "metric" and item.cursor.metric_id > cursor.metric_id:
        return replace(cursor, metric_id=item.cursor.metric_id)
    return None


def _format(item: Item, cursor: Cursor) -> bytes:
    data = {"type": item.type, **item.data}
    return sse.format_event(data, event=item.type, id=cursor.encode())


def respond(job_id: str, caller: str, raw_cursor: str | None) -> Response:
    """The streaming answer for a job the caller may see (the API's and the UI's route),
    or 429 / 503 with Retry-After when the key or this process holds all it may."""
    cursor = Cursor.decode(raw_cursor) if raw_cursor else Cursor()
    settings: Settings = current_app.config["KILN_SETTINGS"]
    admitted = slots()
    slot = admitted.take(caller)
    if slot is None:
        detail = f"this key already has {admitted.per_key} live streams open; close one, or poll"
        return _refused(TooManyStreams(detail))
    if not admitted.take_process_slot():
        admitted.release(slot)
        return _refused(StreamsBusy("this web process holds all the streams it can; poll"))

    released = threading.Event()

    def release() -> None:  # once, however many times the server closes the response
        if not released.is_set():
            released.set()
            admitted.release(slot)
            admitted.release_process_slot()

    body = stream(
        hub(),
        job_id,
        cursor,
        keepalive_s=settings.stream_keepalive_s,
        renew=lambda: admitted.renew(slot),
    )
    response = Response(body, mimetype=sse.MEDIA_TYPE, headers={"X-Accel-Buffering": "no"})
    # call_on_close, not the generator's own finally: a client gone before the first byte
    # closes a generator that never started, whose finally never runs.
    response.call_on_close(release)
    return response


def _refused(error: KilnError) -> Response:
    response = problem(error.status, error.code, error.message)
    response.headers["Retry-After"] = str(REFUSED_RETRY_AFTER_S)
    return response
