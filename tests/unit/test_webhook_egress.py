"""kiln.egress: which URLs a webhook may name, and the guarded POST (a real HTTP server on
127.0.0.1 as the receiver; resolvers stand in for DNS where a test needs a name)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kiln import egress
from tests.webhook_receiver import Receiver

STRICT = egress.Policy()
OPEN = egress.Policy(allow_private=True)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "example.com/hook",
        "http:///no-host",
        "http://user:pass@example.com/hook",
        "http://example.com:99999/hook",
        "http://example.com/a b",
    ],
)
def test_only_plain_http_urls_with_a_host_pass_the_syntax_check(url: str) -> None:
    with pytest.raises(egress.Refused):
        egress.check_syntax(url)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 (an address to refuse)
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a public"),  # carrier-grade NAT
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str, why: str) -> None:
    refusal = STRICT.refusal(ipaddress.ip_address(address))
    assert refusal is not None
    assert why in refusal
    assert OPEN.refusal(ipaddress.ip_address(address)) is None


def test_public_addresses_pass() -> None:
    for address in ("93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"):
        assert STRICT.refusal(ipaddress.ip_address(address)) is None


def test_allowed_networks_open_only_themselves() -> None:
    policy = egress.Policy.parse(False, " 10.20.0.0/16 , fd00::/8")
    assert policy.refusal(ipaddress.ip_address("10.20.5.6")) is None
    assert policy.refusal(ipaddress.ip_address("fd00::5")) is None
    assert policy.refusal(ipaddress.ip_address("10.21.0.1")) is not None
    assert policy.refusal(ipaddress.ip_address("127.0.0.1")) is not None
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 network"):
        egress.Policy.parse(False, "10.0.0.0/33")


def _resolver(*answers: str) -> Any:
    """A getaddrinfo that answers `answers` (one address each call, the last repeating)."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        address = answers[min(len(calls), len(answers) - 1)]
        calls.append(host)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


def test_names_are_refused_by_what_they_resolve_to() -> None:
    assert egress.check_url("https://hooks.example.com/x", STRICT, _resolver("93.184.216.34"))
    with pytest.raises(
        egress.Refused, match=r"resolves to 169\.254\.169\.254, which is a link-local address"
    ):
        egress.check_url("https://hooks.example.com/x", STRICT, _resolver("169.254.169.254"))
    with pytest.raises(egress.Refused, match="loopback"):
        egress.check_url("http://localhost:8000/x", STRICT)  # /etc/hosts, no DNS
    with pytest.raises(egress.Refused, match="loopback"):
        egress.check_url("http://[::1]:8000/x", STRICT)


def test_a_name_with_any_private_address_is_refused_outright() -> None:
    def both(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
        ]

    with pytest.raises(egress.Refused, match=r"to 10\.0\.0\.1, which is a private address"):
        egress.check_url("http://hooks.example.com/", STRICT, both)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def nothing(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(egress.Refused, match="does not resolve"):
        egress.check_url("http://nowhere.invalid/", STRICT, nothing)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver(lambda request, earlier: 204) as running:
        yield running


def test_post_delivers_and_answers_the_status(receiver: Receiver) -> None:
    answer = egress.post(receiver.url + "?token=t", b'{"a":1}', {"x-test": "1"}, OPEN, timeout_s=10)
    assert answer.status == 204
    assert answer.latency_ms >= 0
    (request,) = receiver.snapshot()
    assert request.path == "/hook?token=t"
    assert request.body == '{"a":1}'
    assert request.headers["x-test"] == "1"


def test_post_never_connects_to_a_refused_address(receiver: Receiver) -> None:
    with pytest.raises(egress.Refused, match="loopback"):
        egress.post(receiver.url, b"{}", {}, STRICT, timeout_s=10)
    assert receiver.snapshot() == []


def test_post_connects_to_the_address_it_checked_not_a_later_dns_answer(
    receiver: Receiver,
) -> None:
    """DNS rebinding: the name resolved to a public address when the job was submitted,
    and resolves to loopback now. The request resolves once and refuses."""
    port = receiver.server.server_address[1]
    rebinding = _resolver("93.184.216.34", "127.0.0.1")
    url = f"http://hooks.example.com:{port}/hook"
    egress.check_url(url, STRICT, rebinding)  # at submission: public
    with pytest.raises(
        egress.Refused, match=r"example\.com resolves to 127\.0\.0\.1, which is a loopback"
    ):
        egress.post(url, b"{}", {}, STRICT, timeout_s=10, getaddrinfo=rebinding)
    assert receiver.snapshot() == []


class _Redirect(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self) -> None:
        _Redirect.hits.append(self.path)
        self.send_response(307)
        self.send_header("location", "/elsewhere")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_post_does_not_follow_redirects() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert egress.post(url, b"{}", {}, OPEN, timeout_s=10).status == 307
        assert _Redirect.hits == ["/hook"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_receiver_that_does_not_answer_in_time_is_cut_off(receiver: Receiver) -> None:
    receiver.hold.clear()  # accepts the request and never answers
    with pytest.raises(TimeoutError):
        egress.post(receiver.url, b"{}", {}, OPEN, timeout_s=0.5)
    assert len(receiver.snapshot()) == 1


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_deadline() -> None:
    """A byte at a time, each well within the socket timeout: only the overall deadline
    stops it."""
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 10_000:
                if stop.wait(0.05):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with pytest.raises(TimeoutError):
            egress.post(url, b"{}", {}, OPEN, timeout_s=1.0)
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_a_closed_port_is_an_os_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1"):
        egress.post(f"http://127.0.0.1:{port}/", b"{}", {}, OPEN, timeout_s=5)
