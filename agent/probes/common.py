"""What the dependency probes share: TLS options and contexts, secret discovery, address formatting."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import Field, model_validator

from agent.fields import Strict
from agent.probes.base import CheckFailed, Context
from agent.probes.blocking import blocking

# Header and query-parameter names whose values are credentials: masked as *** wherever they could show.
SENSITIVE_NAME = re.compile(r"auth|cookie|token|secret|passw|api[-_]?key|session|signature|credential", re.I)


def address(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def secret_forms(value: str | None) -> list[str]:
    """A secret as configured plus its percent-decoded form (a URL carries it encoded, errors may decode it)."""
    if not value:
        return []
    out = [value]
    decoded = unquote(value)
    if decoded != value:
        out.append(decoded)
    return out


def url_secrets(url: str) -> list[str]:
    """The password of a URL (user:password@) and the values of credential-like query parameters."""
    parts = urlsplit(url)
    out = secret_forms(parts.password)
    for key, value in parse_qsl(parts.query, keep_blank_values=False):
        if SENSITIVE_NAME.search(key):
            out += secret_forms(value)
    return out


def header_secrets(headers: Mapping[str, str]) -> list[str]:
    """Values of credential-like headers (Authorization, Cookie, X-Api-Key...) and their credential part."""
    out = []
    for name, value in headers.items():
        if SENSITIVE_NAME.search(name) and value:
            out.append(value)
            scheme, _, credential = value.partition(" ")
            if credential.strip():  # "Bearer abc": mask "abc" on its own too
                out.append(credential.strip())
    return out


def unique(secrets: Iterable[str]) -> tuple[str, ...]:
    """Longest first, so a secret that contains another is masked whole."""
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


TLS_KEYS = ("tls_verify", "ca_file", "cert_file", "key_file")


class TLSOptions(Strict):
    """Client-side TLS keys shared by the probes that speak TLS."""

    tls_verify: bool = Field(default=True, description="verify the server's certificate chain and name")
    ca_file: str | None = Field(default=None, min_length=1, description="PEM CA bundle instead of the system CAs")
    cert_file: str | None = Field(default=None, min_length=1, description="client certificate (PEM) for mutual TLS")
    key_file: str | None = Field(default=None, min_length=1, description="its private key, if not in cert_file")

    @model_validator(mode="after")
    def _tls_keys_consistent(self) -> TLSOptions:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file: needs cert_file")
        if self.ca_file and not self.tls_verify:
            raise ValueError("ca_file: unused when tls_verify = false; remove one of them")
        return self

    def tls_files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert_file, self.key_file) if f)


def _mtimes(files: tuple[str, ...]) -> tuple[float, ...]:
    out = []
    for f in files:
        try:
            out.append(os.stat(f).st_mtime)
        except OSError:
            out.append(-1.0)
    return tuple(out)


def _build(opts: TLSOptions, check_hostname: bool) -> ssl.SSLContext:
    try:
        sslctx = ssl.create_default_context(cafile=opts.ca_file if opts.tls_verify else None)
        if not opts.tls_verify:
            sslctx.check_hostname = False
            sslctx.verify_mode = ssl.CERT_NONE
        else:
            sslctx.check_hostname = check_hostname
        if opts.cert_file:
            sslctx.load_cert_chain(opts.cert_file, opts.key_file)
    except FileNotFoundError as e:
        raise CheckFailed(f"tls: cannot read {e.filename}: no such file", "config") from None
    except (OSError, ssl.SSLError) as e:
        raise CheckFailed(f"tls: cannot load the certificate files: {getattr(e, 'reason', None) or e}",
                          "config") from None
    return sslctx


def _cached(opts: TLSOptions, name: str, memo: dict[Any, Any], check_hostname: bool) -> ssl.SSLContext:
    key = ("tls-context", name, check_hostname)
    stamp = (opts, _mtimes(opts.tls_files()))
    hit = memo.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    sslctx = _build(opts, check_hostname)
    memo[key] = (stamp, sslctx)
    return sslctx


async def client_context(opts: TLSOptions, name: str, ctx: Context, check_hostname: bool = True) -> ssl.SSLContext:
    """The check's SSL context, built once and rebuilt when its config or its files change on disk.

    Built in a thread: loading the system CA bundle and key files is file I/O. Rotated certificates
    (cert-manager, Vault agent) are picked up on the next sample, without a reload.
    """
    return await blocking(ctx, f"{name}/tls-load", "tls", _cached, opts, name, ctx.memo, check_hostname,
                          busy=f"tls: still loading the certificate files of {name}")
