"""http: a request answers with an expected status (and body) within a latency bound."""

from __future__ import annotations

import asyncio
import base64
import errno
import re
import socket
import ssl
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import aiohttp
from pydantic import AnyHttpUrl, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from agent.fields import HOUR, Duration, format_duration
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking
from agent.probes.common import (
    SENSITIVE_NAME,
    TLS_KEYS,
    TLSOptions,
    client_context,
    header_secrets,
    unique,
    url_secrets,
)

if TYPE_CHECKING:
    import regex

_RANGE = re.compile(r"^([1-5])xx$|^(\d{3})\s*-\s*(\d{3})$")


def parse_status(item: int | str) -> tuple[int, int]:
    """(low, high) from 200, "2xx" or "200-299"."""
    if isinstance(item, int) and not isinstance(item, bool):
        if not 100 <= item <= 599:
            raise ValueError(f"status {item} is not between 100 and 599")
        return item, item
    if isinstance(item, str):
        text = item.strip().lower()
        if text.isdigit():
            return parse_status(int(text))
        m = _RANGE.match(text)
        if m and m.group(1):
            return int(m.group(1)) * 100, int(m.group(1)) * 100 + 99
        if m:
            low, high = int(m.group(2)), int(m.group(3))
            if 100 <= low <= high <= 599:
                return low, high
    raise ValueError(f"{item!r} is not a status: use 200, \"2xx\" or \"200-299\"")


def format_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


class Config(TLSOptions, CheckBase):
    type: Literal["http"]
    url: AnyHttpUrl
    method: Literal["GET", "HEAD", "POST", "PUT", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = Field(default=None, description="request body (for POST/PUT)")
    expect_status: list[int | str] = Field(default_factory=lambda: list[int | str](["2xx"]), min_length=1)
    body_contains: str | None = Field(default=None, min_length=1)
    body_regex: str | None = Field(default=None, min_length=1)
    max_body_bytes: int = Field(default=65536, ge=1, le=16 * 1024 * 1024,
                                description="at most this much of the body is read and matched")
    max_latency: Annotated[float, Duration(HOUR, positive=True)] | None = Field(
        default=None, description="a slower answer fails the check")
    follow_redirects: bool = False
    max_redirects: int = Field(default=5, ge=1, le=30)
    server_name: str | None = Field(default=None, min_length=1, description="TLS SNI and name to verify")

    _ranges: tuple[tuple[int, int], ...] = PrivateAttr(default=())
    _regex: regex.Pattern[str] | None = PrivateAttr(default=None)

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, v: list[int | str]) -> list[int | str]:
        for item in v:
            parse_status(item)
        return v

    @field_validator("body_regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            import regex  # the regex module (~1.4 MB) loads only for configs that use body_regex

            try:
                regex.compile(v)
            except regex.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @field_validator("max_latency")
    @classmethod
    def _latency_below_timeout(cls, v: float | None, info: ValidationInfo) -> float | None:
        timeout = info.data.get("timeout")
        if v is not None and timeout is not None and v >= timeout:
            raise ValueError(f"must be shorter than timeout ({format_duration(timeout)}): "
                             "a slower answer already fails as a timeout")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.method == "HEAD" and (self.body_contains or self.body_regex):
            raise ValueError("method: HEAD returns no body for body_contains/body_regex to match")
        if self.url.username and any(h.lower() == "authorization" for h in self.headers):
            raise ValueError("headers: an Authorization header and credentials in the url: use one of them")
        tls_keys = [k for k in (*TLS_KEYS, "server_name") if k in self.model_fields_set]
        if self.url.scheme == "http" and tls_keys:
            raise ValueError(f"{tls_keys[0]}: needs an https url")
        return self

    def model_post_init(self, _context: object) -> None:
        self._ranges = tuple(parse_status(s) for s in self.expect_status)
        if self.body_regex:
            import regex

            self._regex = regex.compile(self.body_regex)

    def threshold(self) -> str:
        out = f"status in {format_ranges(self._ranges)}"
        if self.max_latency is not None:
            out += f", within {self.max_latency * 1000:.0f} ms"
        if self.body_contains is not None:
            out += f", body contains {self.body_contains!r}"
        if self.body_regex is not None:
            out += f", body matches /{self.body_regex}/"
        return out

    def secrets(self) -> tuple[str, ...]:
        return unique([*url_secrets(str(self.url)), *header_secrets(self.headers)])

    def status_ok(self, status: int) -> bool:
        return any(lo <= status <= hi for lo, hi in self._ranges)


REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _redirect_target(url: str, location: str) -> str:
    """Where a Location header sends the next request; CheckFailed for one that is not an http(s) URL."""
    target = urljoin(url, location.strip())
    parts = urlsplit(target)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise CheckFailed("http: a redirect whose Location is not a URL", "redirect") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CheckFailed(f"http: a redirect to a {parts.scheme or 'relative'} URL was not followed", "redirect")
    # A server does not get to choose the credentials we send.
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _basic_auth(url: str) -> dict[str, str]:
    """The Authorization header aiohttp derives from a url's user:password (latin-1, as it encodes it)."""
    parts = urlsplit(url)
    if not parts.username:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    try:
        raw = pair.encode("latin-1")
    except UnicodeEncodeError:
        raw = pair.encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def _request(cfg: Config, ctx: Context, sslarg: ssl.SSLContext | bool) -> aiohttp.ClientResponse:
    """The answer to the configured request, after at most max_redirects redirects when following them.

    aiohttp's own redirects drop only Authorization and Cookie on the way to another origin; every other
    header we mask as a secret (X-Api-Key, X-Vault-Token...) would follow. So the redirects are followed
    here: the secret headers, the url's user:password, the Host header and server_name go to the origin
    (scheme, host, port) of `url` only, whichever hop it comes back at.
    """
    start = str(cfg.url)
    home = _origin(start)
    kept = {k: v for k, v in cfg.headers.items() if not SENSITIVE_NAME.search(k) and k.lower() != "host"}
    again = {**cfg.headers, **_basic_auth(start)}  # the first request has the url's user:password itself
    method, body, url, hops = cfg.method, cfg.body, start, 0
    while True:
        at_home = _origin(url) == home
        resp = await ctx.http().request(
            method, url, headers=(again if hops else cfg.headers) if at_home else kept, data=body, ssl=sslarg,
            server_hostname=cfg.server_name if at_home else None, allow_redirects=False,
        )
        if not (cfg.follow_redirects and resp.status in REDIRECTS and "Location" in resp.headers):
            return resp
        location = resp.headers["Location"]
        resp.release()
        if hops == cfg.max_redirects:
            raise CheckFailed(f"http: more than {cfg.max_redirects} redirects", "redirect")
        hops += 1
        url = _redirect_target(url, location)
        if (resp.status == 303 and method != "HEAD") or (resp.status in (301, 302) and method == "POST"):
            method, body = "GET", None  # what browsers and aiohttp do; 307 and 308 keep both


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> str:
    """At most `cap` bytes of the body: a huge or endless body never fills memory."""
    chunks, size = [], 0
    while size < cap:
        chunk = await resp.content.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode(resp.charset or "utf-8", errors="replace")


def _search(pattern: regex.Pattern[str], text: str, limit: float) -> bool:
    """In a worker thread. A user's pattern can backtrack for ages: the regex module lets go of the GIL
    while matching (concurrent) so the event loop keeps running, and gives up after `limit` seconds so
    an abandoned match does not burn a core."""
    return pattern.search(text, concurrent=True, timeout=limit) is not None


def _connect_failure(e: aiohttp.ClientConnectorError) -> CheckFailed:
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        cert_error = e.certificate_error
        detail = getattr(cert_error, "verify_message", None) or str(cert_error)
        return CheckFailed(f"http: TLS certificate not accepted: {detail}", "tls")
    if isinstance(e, aiohttp.ClientSSLError):
        return CheckFailed(f"http: TLS handshake failed: {getattr(e.os_error, 'reason', None) or e}", "tls")
    os_error = e.os_error
    if isinstance(os_error, socket.gaierror):
        return CheckFailed(f"http: cannot resolve {e.host}: {os_error.strerror}", "dns")
    if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
        return CheckFailed(f"http: connection refused by {e.host}:{e.port}", "refused")
    return CheckFailed(f"http: cannot connect to {e.host}:{e.port}: {os_error.strerror or os_error}",
                       "unreachable")


async def probe(cfg: Config, ctx: Context) -> Observation:
    sslarg: ssl.SSLContext | bool = False if not cfg.tls_verify else True
    if cfg.url.scheme == "https" and (cfg.tls_files() or not cfg.tls_verify):
        sslarg = await client_context(cfg, cfg.name, ctx)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with await _request(cfg, ctx, sslarg) as resp:
            status = resp.status
            location = resp.headers.get("Location", "")
            want_body = cfg.body_contains is not None or cfg._regex is not None
            text = await _read_capped(resp, cfg.max_body_bytes) if want_body and cfg.status_ok(status) else ""
    except aiohttp.ClientConnectorError as e:
        raise _connect_failure(e) from None
    except aiohttp.ServerDisconnectedError:
        raise CheckFailed("http: the server closed the connection without answering", "closed") from None
    except aiohttp.ClientResponseError as e:
        raise CheckFailed(f"http: invalid response: {e.message}", "protocol") from None
    except aiohttp.ClientPayloadError as e:
        raise CheckFailed(f"http: the body broke off: {e}", "protocol") from None
    except aiohttp.ClientError as e:
        raise CheckFailed(f"http: {type(e).__name__}: {e}".rstrip(": "), "error") from None
    elapsed = loop.time() - t0
    ms = elapsed * 1000
    obs = Observation(value=elapsed, unit="seconds", detail=f"{status} in {ms:.0f} ms",
                      values=(("status_code", float(status), ""),))
    if not cfg.status_ok(status):
        note = f"; redirect to {location} not followed" if 300 <= status < 400 and location else ""
        raise CheckFailed(f"http: {status} after {ms:.0f} ms (expected {format_ranges(cfg._ranges)}{note})",
                          "status", observation=obs)
    if cfg.max_latency is not None and elapsed > cfg.max_latency:
        raise CheckFailed(f"http: {status} after {ms:.0f} ms > {cfg.max_latency * 1000:.0f} ms", "slow",
                          observation=obs)
    if cfg.body_contains is not None and cfg.body_contains not in text:
        raise CheckFailed(f"http: {status} but the body lacks {cfg.body_contains!r}", "body", observation=obs)
    if cfg._regex is not None:
        busy = f"http: {status} but the previous body_regex match is still running"
        try:
            found = await blocking(ctx, f"{cfg.name}/regex", "http", _search, cfg._regex, text, cfg.timeout,
                                   busy=busy)
        except TimeoutError:
            raise CheckFailed(f"http: {status} but body_regex backtracked past the timeout", "timeout",
                              observation=obs) from None
        if not found:
            raise CheckFailed(f"http: {status} but the body does not match /{cfg.body_regex}/", "body",
                              observation=obs)
    return obs
