"""One hub per web process that watches the jobs its open streams follow, so that 500
streams cost a few queries a tick, not 500 readers polling the database.

Every `TICK_S` the hub's thread asks the database, in three queries for all watched jobs
(`db.job_stream.latest_ids`), which jobs moved; for each that did it reads the new rows
once (`read_after` from the job's feed cursor) and wakes the streams of that job. A
`Feed` keeps a job's recent rows (up to `BUFFER` of them) and its latest snapshot; a
stream that is further behind than the buffer reaches reads the database itself
(`catch_up`), then goes on from the feed. Nothing is published by the workers: the
database is the only source, so a stream misses nothing that was committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from db import job_stream
from db.job_stream import Cursor, Delta, Head, Item, Snapshot

log = logging.getLogger(__name__)

#: How often the hub looks for moved jobs: the most a committed report waits to be seen.
TICK_S = 0.2
#: Rows (log lines and metric points) a feed keeps for streams that lag a little.
BUFFER = 2000


@dataclass
class Feed:
    """One watched job: its recent rows, its latest snapshot, and who follows it."""

    job_id: str
    #: The hub has read every row up to here; rows after `floor` are all in `rows`.
    cursor: Cursor
    floor: Cursor
    rows: deque[Item] = field(default_factory=deque)
    snapshot: Snapshot | None = None
    #: Bumped on every change; streams wait for it to move.
    version: int = 0
    #: time.monotonic() of the read `snapshot` came from.
    observed_at: float = 0.0
    followers: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def absorb(self, delta: Delta, observed_at: float) -> None:
        """Append a read's rows (called with `changed` held)."""
        for item in job_stream.items(delta, self.cursor):
            if item.type in {"log", "metric"}:
                self.rows.append(item)
                self.cursor = item.cursor
        while len(self.rows) > BUFFER:
            self.floor = self.rows.popleft().cursor
        if delta.complete:
            self.snapshot = delta.snapshot
            self.observed_at = observed_at
        self.version += 1
        self.changed.notify_all()


class Hub:
    """The process's watcher thread and its feeds (started on first use)."""

    def __init__(self, sessions: sessionmaker[Session], tick_s: float = TICK_S) -> None:
        self._sessions = sessions
        self._tick_s = tick_s
        self._feeds: dict[str, Feed] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def follow(self, job_id: str) -> Feed:
        """The job's feed, created (at the database's latest ids) if nobody follows it."""
        with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                feed = self._new_feed(job_id)
                self._feeds[job_id] = feed
            feed.followers += 1
            if not self._stopped:
                self._start()
            return feed

    def leave(self, feed: Feed) -> None:
        with self._lock:
            feed.followers -= 1
            if feed.followers <= 0 and self._feeds.get(feed.job_id) is feed:
                del self._feeds[feed.job_id]

    def catch_up(self, job_id: str, cursor: Cursor) -> tuple[Delta | None, float]:
        """A stream's own read from `cursor` (it is behind the feed's buffer)."""
        observed_at = time.monotonic()
        with self._sessions() as session:
            return job_stream.read_after(session, job_id, cursor), observed_at

    def _new_feed(self, job_id: str) -> Feed:
        with self._sessions() as session:
            log_id, metric_id, _ = job_stream.latest_ids(session, [job_id]).get(
                job_id, (0, 0, None)
            )
        start = Cursor(log_id=log_id, metric_id=metric_id)
        # The first tick reads the snapshot: version 0 means "not read yet".
        return Feed(job_id=job_id, cursor=start, floor=start)

    def _start(self) -> None:
        """Start the thread unless it runs (called with the lock held)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kiln-stream-hub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """Tick while any stream follows a job; then end (the next stream starts again)."""
        while True:
            with self._lock:
                if not self._feeds or self._stopped:
                    self._thread = None
                    return
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a database blip must not end every stream of the process
                log.exception("stream hub tick failed; retrying")
            time.sleep(max(0.0, self._tick_s - (time.monotonic() - started)))

    def stop(self) -> None:
        """End the thread (and its database reads) before the engine is disposed; the
        process's streams see no more changes."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def tick(self) -> None:
        """Read what moved for every watched job, and wake their streams."""
        with self._lock:
            feeds = list(self._feeds.values())
        watched = [f for f in feeds if f.snapshot is None or not f.snapshot.terminal]
        if not watched:
            return
        with self._sessions() as session:
            heads = job_stream.latest_ids(session, [f.job_id for f in watched])
            for feed in watched:
                head = heads.get(feed.job_id)
                if head is None:  # deleted: its streams end
                    self._gone(feed)
                elif _moved(feed, head):
                    observed_at = time.monotonic()
                    delta = job_stream.read_after(session, feed.job_id, feed.cursor)
                    with feed.changed:
                        if delta is None:
                            self._gone(feed)
                        else:
                            feed.absorb(delta, observed_at)
            session.rollback()  # nothing written: end the read transaction

    @staticmethod
    def _gone(feed: Feed) -> None:
        with feed.changed:
            feed.snapshot = None
            feed.version = -1
            feed.changed.notify_all()


def _moved(feed: Feed, latest: tuple[int, int, Head]) -> bool:
    log_id, metric_id, head = latest
    if log_id > feed.cursor.log_id or metric_id > feed.cursor.metric_id:
        return True
    snap = feed.snapshot
    return snap is None or head != (snap.attempt, snap.state, snap.progress, snap.message)


def wait_for_change(feed: Feed, seen: int, timeout_s: float) -> int:
    """Block until the feed's version moves past `seen` (or the timeout); its version."""
    with feed.changed:
        feed.changed.wait_for(lambda: feed.version != seen, timeout=timeout_s)
        return feed.version
