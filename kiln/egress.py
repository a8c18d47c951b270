"""Requests Kiln makes to URLs its users name (webhooks), guarded against SSRF.

A user-named URL must be http(s), and every address its host resolves to must be public:
loopback, private, link-local (cloud metadata at 169.254.169.254), multicast, reserved and
unspecified addresses are refused, unless the operator allows private addresses
(KILN_WEBHOOK_ALLOW_PRIVATE) or names networks to allow (KILN_WEBHOOK_ALLOWED_CIDRS).

The check runs when the URL is submitted and again on every request. At request time the
connection is made to the very address that was checked (the host is resolved once, in
`connect`), so a DNS answer that changes between check and use (DNS rebinding) cannot
reach an internal address. Redirects are never followed (http.client does not), and every
request has one deadline for connect, send and the response's headers together.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: getaddrinfo's signature, for tests that resolve without DNS.
Resolver = Callable[..., list[tuple[Any, ...]]]

_DEFAULT_PORTS = {"http": 80, "https": 443}


class Refused(ValueError):
    """The URL or the address it resolves to may not be requested; the message says why."""


class NotPublic(Refused):
    """The host is, or resolves to, an address the policy does not allow (loopback,
    private, ...): one an operator may allow (KILN_WEBHOOK_ALLOW_PRIVATE, _ALLOWED_CIDRS)."""


@dataclass(frozen=True)
class Policy:
    """Which destinations are allowed besides public addresses."""

    #: Any address at all (tests, a receiver on the operator's own network).
    allow_private: bool = False
    #: Networks allowed even though they are not public.
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allow_private: bool, cidrs: str) -> Policy:
        """From the settings' text: `cidrs` is a comma-separated list such as
        "10.0.0.0/8,fd00::/8" (ValueError for one that is not a network)."""
        networks = tuple(ipaddress.ip_network(c.strip()) for c in cidrs.split(",") if c.strip())
        return cls(allow_private, networks)

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached ("127.0.0.1 is a loopback address"), or None."""
        kind = self.refused_kind(address)
        return None if kind is None else f"{address} is {kind}"

    def refused_kind(self, address: IPAddress) -> str | None:
        """What kind of refused address `address` is ("a loopback address"), or None if it
        may be reached."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if self.allow_private or any(address in net for net in self.allowed_networks):
            return None
        for test, what in _NOT_PUBLIC:
            if getattr(address, test):
                return f"a {what} address"
        if not address.is_global:
            return "not a public address"
        return None


#: The address classes refused, most specific first (so the reason names the right one).
_NOT_PUBLIC = (
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_unspecified", "unspecified"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


def check_syntax(url: str) -> SplitResult:
    """The URL split, if it is an absolute http(s) URL with a host and no credentials;
    Refused otherwise. Needs no network."""
    if not url.strip():
        raise Refused("the URL is empty")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise Refused(f"not a valid URL: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise Refused("only http and https URLs are allowed")
    if not parts.hostname:
        raise Refused("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise Refused("credentials in the URL are not allowed; put a token in the path or query")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise Refused("the URL contains whitespace or control characters")
    return parts


def resolve(
    host: str, port: int, policy: Policy, getaddrinfo: Resolver = socket.getaddrinfo
) -> list[tuple[Any, ...]]:
    """The (family, type, proto, canonname, sockaddr) entries for host:port, every one of
    them allowed; Refused if the host does not resolve or any address is not allowed (a
    name that also points inside is refused outright, not half-used)."""
    try:
        found = getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"the host {host!r} does not resolve ({exc})") from None
    if not found:
        raise Refused(f"the host {host!r} does not resolve")
    for entry in found:
        address = ipaddress.ip_address(str(entry[4][0]).split("%", 1)[0])
        if (kind := policy.refused_kind(address)) is not None:
            if host.strip("[]") == str(address):  # an address literal: it names itself
                raise NotPublic(f"{address} is {kind}")
            raise NotPublic(f"{host} resolves to {address}, which is {kind}")
    return found


def check_url(url: str, policy: Policy, getaddrinfo: Resolver = socket.getaddrinfo) -> str:
    """The URL, if it may be requested now (syntax and every resolved address); Refused
    otherwise."""
    parts = check_syntax(url)
    assert parts.hostname is not None  # check_syntax refused a URL without one
    resolve(parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme], policy, getaddrinfo)
    return url


class Answer(NamedTuple):
    """What a receiver answered: its status code and how long it took (ms)."""

    status: int
    latency_ms: float


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    policy: Policy,
    timeout_s: float,
    getaddrinfo: Resolver = socket.getaddrinfo,
) -> Answer:
    """POST `body` to `url`, connecting only to an allowed address, following no
    redirect, and giving up `timeout_s` after starting (OSError: a TimeoutError, a refused
    connection, a TLS error; Refused: the address is not allowed). The response's body is
    not read: its status is the answer."""
    parts = check_syntax(url)
    connection = _connection(parts, policy, timeout_s, getaddrinfo)
    started = time.monotonic()
    # socket timeouts bound each read; this bounds the whole exchange, so a receiver
    # that trickles its answer a byte at a time is cut off too.
    deadline = threading.Timer(timeout_s, connection.abort)
    deadline.start()
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection.request("POST", target, body=body, headers=headers)
        status = connection.getresponse().status
        if connection.aborted:  # cut mid-headers: http.client may take EOF for their end
            raise TimeoutError
    except (OSError, http.client.HTTPException) as exc:
        if connection.aborted:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from None
        if isinstance(exc, OSError):
            raise
        raise OSError(f"bad HTTP answer: {exc!r}") from None
    finally:
        deadline.cancel()
        connection.close()
    return Answer(status, (time.monotonic() - started) * 1000)


class _Guarded:
    """Mixed into http.client's connections: connect() resolves the host once, refuses
    a disallowed address, and connects to an allowed one."""

    host: str
    port: int
    timeout: float | None
    sock: socket.socket | None
    policy: Policy
    getaddrinfo: Resolver
    aborted: bool

    def _open_socket(self) -> socket.socket:
        errors: list[str] = []
        for family, kind, proto, _, address in resolve(
            self.host, self.port, self.policy, self.getaddrinfo
        ):
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.timeout)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                errors.append(f"{address[0]}: {exc}")
                continue
            self.sock = sock
            return sock
        raise ConnectionError("; ".join(errors) or f"could not connect to {self.host}")

    def abort(self) -> None:
        """Cut the connection from another thread (the deadline): a blocked read returns."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _HTTPConnection(_Guarded, http.client.HTTPConnection):
    def connect(self) -> None:
        self._open_socket()


class _HTTPSConnection(_Guarded, http.client.HTTPSConnection):
    _context: ssl.SSLContext

    def connect(self) -> None:
        raw = self._open_socket()
        # The certificate is checked against the URL's host name, not the address.
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


def _connection(
    parts: SplitResult, policy: Policy, timeout_s: float, getaddrinfo: Resolver
) -> _HTTPConnection | _HTTPSConnection:
    assert parts.hostname is not None
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    connection: _HTTPConnection | _HTTPSConnection
    if parts.scheme == "https":
        connection = _HTTPSConnection(
            parts.hostname, port, timeout=timeout_s, context=ssl.create_default_context()
        )
    else:
        connection = _HTTPConnection(parts.hostname, port, timeout=timeout_s)
    connection.policy, connection.getaddrinfo, connection.aborted = policy, getaddrinfo, False
    return connection
