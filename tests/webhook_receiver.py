"""A real webhook receiver for tests and bench/chaos.py: an HTTP server on 127.0.0.1 in a
thread that records every request and answers as the test scripts it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: str
    #: The body as verified on arrival with the receiver's `secrets` (the timestamp
    #: window is checked against the clock then), or None if none verified it.
    verified_on_arrival: Any | None = None

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def verified(self, secrets: list[str]) -> Any | None:
        """The parsed body if one of `secrets` verifies the signature (the reference
        library's check, timestamp window included), else None."""
        for secret in secrets:
            try:
                return Webhook(secret).verify(self.body, self.headers)
            except WebhookVerificationError:
                continue
        return None


#: Decides the status of a request, given it and how many requests with its webhook-id
#: came before it (0 for the first).
Script = Callable[[Received, int], int]


class Receiver:
    """Records requests in `received`; answers `script(request, earlier)` (200 by default).
    While `hold` is clear, answers wait (a receiver that is slow, or hangs). With
    `secrets` set, each request is verified as it arrives (Received.verified_on_arrival)."""

    def __init__(self, script: Script | None = None) -> None:
        self.script: Script = script or (lambda _request, _earlier: 200)
        self.secrets: list[str] = []
        self.received: list[Received] = []
        self.hold = threading.Event()
        self.hold.set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length).decode()
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Received(self.path, headers, body)
                if receiver.secrets:
                    verified = request.verified(receiver.secrets)
                    request = Received(self.path, headers, body, verified)
                with receiver._changed:
                    earlier = sum(
                        1 for r in receiver.received if r.webhook_id == request.webhook_id
                    )
                    receiver.received.append(request)
                    receiver._changed.notify_all()
                receiver.hold.wait(60)
                status = receiver.script(request, earlier)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(self, check: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait until `check(requests so far)` holds; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: check(self.received), timeout)

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
