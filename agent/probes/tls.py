"""tls: a TLS server presents a valid certificate for its name, with enough days left before it expires."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.common import TLSOptions, address, client_context

if TYPE_CHECKING:
    from cryptography import x509

# OpenSSL verify codes worth their own metric label; any other verification failure is `untrusted`.
VERIFY_KINDS = {10: "expired", 9: "not_yet_valid", 62: "hostname"}


class Config(TLSOptions, CheckBase):
    type: Literal["tls"]
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=443, ge=1, le=65535)
    server_name: str | None = Field(default=None, min_length=1,
                                    description="SNI and the name the certificate must match; default: host")
    min_days_left: float = Field(default=0, ge=0, le=3650, description="fail when the leaf expires sooner")

    def model_post_init(self, _context: object) -> None:
        from cryptography import x509  # noqa: F401 - loaded with the config that needs it, not at agent start

    def threshold(self) -> str:
        checks = "valid chain and name, " if self.tls_verify else ""
        return f"{checks}expires in >= {self.min_days_left:g} days"


def _leaf(writer: asyncio.StreamWriter) -> x509.Certificate:
    from cryptography import x509

    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        raise CheckFailed("tls: the server sent no certificate", "handshake")
    return x509.load_der_x509_certificate(der)


def _observe(cert: x509.Certificate, extra: str = "") -> tuple[Observation, float]:
    not_after = cert.not_valid_after_utc
    days = (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400  # wall clock: expiry is a date
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    detail = f"{subject}, expires {not_after:%Y-%m-%dT%H:%M:%SZ} ({days:.1f} days){extra}"
    obs = Observation(value=round(days, 3), unit="days", detail=detail,
                      values=(("expiry_timestamp", not_after.timestamp(), "seconds"),))
    return obs, days


async def _handshake(cfg: Config, sslctx: ssl.SSLContext) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection(cfg.host, cfg.port, ssl=sslctx,
                                              server_hostname=cfg.server_name or cfg.host)
    return writer


async def _unverified_leaf(cfg: Config, ctx: Context) -> x509.Certificate | None:
    """The leaf the server presents, without verification: to report the expiry of a rejected certificate."""
    unverified = TLSOptions(tls_verify=False, cert_file=cfg.cert_file, key_file=cfg.key_file)
    try:
        writer = await _handshake(cfg, await client_context(unverified, cfg.name + "/unverified", ctx))
    except (OSError, CheckFailed):
        return None
    try:
        return _leaf(writer)
    finally:
        writer.close()


async def probe(cfg: Config, ctx: Context) -> Observation:
    target = address(cfg.host, cfg.port)
    sslctx = await client_context(cfg, cfg.name, ctx)
    try:
        writer = await _handshake(cfg, sslctx)
    except ssl.SSLCertVerificationError as e:
        cert = await _unverified_leaf(cfg, ctx)
        obs = _observe(cert)[0] if cert is not None else None
        kind = VERIFY_KINDS.get(e.verify_code, "untrusted")
        raise CheckFailed(f"tls {target}: certificate not accepted: {e.verify_message}", kind,
                          observation=obs) from None
    except ssl.SSLError as e:
        raise CheckFailed(f"tls {target}: handshake failed: {e.reason or e}", "handshake") from None
    except ConnectionRefusedError:
        raise CheckFailed(f"tls {target}: connection refused", "refused") from None
    except (ConnectionResetError, asyncio.IncompleteReadError):
        raise CheckFailed(f"tls {target}: the server closed the connection during the handshake",
                          "handshake") from None
    except OSError as e:
        kind = "dns" if e.errno is None or e.errno < 0 else "unreachable"
        raise CheckFailed(f"tls {target}: {e.strerror or e}", kind) from None
    try:
        cert = _leaf(writer)
        sslobj = writer.get_extra_info("ssl_object")
        obs, days = _observe(cert, f", {sslobj.version()}" if sslobj is not None else "")
    finally:
        writer.close()
    if days < 0:  # only reachable with tls_verify = false; verification rejects an expired certificate
        raise CheckFailed(f"tls {target}: certificate expired {-days:.1f} days ago", "expired", observation=obs)
    if days < cfg.min_days_left:
        raise CheckFailed(f"tls {target}: certificate expires in {days:.1f} days < {cfg.min_days_left:g} days",
                          "expiring", observation=obs)
    return obs
