"""dns: a name resolves (A or AAAA), optionally to expected addresses, optionally through a given server."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking
from agent.probes.common import address

FAMILY = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}


def parse_server(value: str) -> tuple[str, int]:
    """(ip, port) from "10.0.0.2", "127.0.0.1:5353", "::1" or "[::1]:5353"."""
    text = value.strip()
    try:
        return str(ipaddress.ip_address(text)), 53
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = str(ipaddress.ip_address(host)) if sep else None
        port_n = int(port)
    except ValueError:
        ip, port_n = None, 0
    if ip is None or not 1 <= port_n <= 65535:
        raise ValueError(f"{value!r} must be an IP address with an optional port: 127.0.0.1:5353, [::1]:53")
    return ip, port_n


class Config(CheckBase):
    type: Literal["dns"]
    query_name: str = Field(min_length=1, max_length=253, description="the name to resolve")
    record_type: Literal["A", "AAAA"] = "A"
    expect_addresses: list[str] = Field(default_factory=list, description="each must be among the answers")
    server: str | None = Field(default=None, description="ask this DNS server (IP[:PORT]); default: the system's "
                                                         "resolver (getaddrinfo: /etc/hosts, then DNS)")

    @field_validator("server")
    @classmethod
    def _server(cls, v: str | None) -> str | None:
        if v is not None:
            parse_server(v)
        return v

    @field_validator("expect_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_address(item.strip())))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
        return out

    @model_validator(mode="after")
    def _family(self) -> Config:
        version = 4 if self.record_type == "A" else 6
        wrong = [a for a in self.expect_addresses if ipaddress.ip_address(a).version != version]
        if wrong:
            raise ValueError(f"expect_addresses: {', '.join(wrong)} cannot answer an {self.record_type} query")
        return self

    def model_post_init(self, _context: object) -> None:
        if self.server is not None:
            _dnspython()  # now, with the config that needs it: not on the loop at the first sample

    def threshold(self) -> str:
        out = f"{self.query_name} {self.record_type} resolves"
        if self.expect_addresses:
            out += " to include " + ", ".join(self.expect_addresses)
        return out + (f" via {self.server}" if self.server else "")


async def _system(cfg: Config, ctx: Context) -> list[str]:
    busy = f"dns {cfg.query_name}: the previous lookup is still waiting for the system resolver"
    try:
        infos = await blocking(ctx, f"{cfg.name}/dns", "dns", socket.getaddrinfo, cfg.query_name, None,
                               FAMILY[cfg.record_type], socket.SOCK_STREAM, busy=busy)
    except socket.gaierror as e:
        kind = "nxdomain" if e.errno == socket.EAI_NONAME else "error"
        raise CheckFailed(f"dns {cfg.query_name}: {e.strerror}", kind) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _dnspython() -> None:
    """dnspython, imported only for checks that ask a given server (the system resolver needs none)."""
    import dns.asyncresolver  # noqa: F401
    import dns.nameserver  # noqa: F401


async def _server(cfg: Config, ip: str, port: int) -> list[str]:
    import dns.asyncresolver
    import dns.exception
    import dns.nameserver
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port)]
    resolver.cache = None
    # The runner's timeout ends the sample; dnspython's own limit is set past it so it never decides first.
    resolver.lifetime = cfg.timeout + 1.0
    where = address(ip, port)
    try:
        answer = await resolver.resolve(cfg.query_name, cfg.record_type, search=False)
    except dns.resolver.NXDOMAIN:
        raise CheckFailed(f"dns {cfg.query_name}: NXDOMAIN (no such name) from {where}", "nxdomain") from None
    except dns.resolver.NoAnswer:
        raise CheckFailed(f"dns {cfg.query_name}: no {cfg.record_type} record at {where}", "no_answer") from None
    except dns.resolver.NoNameservers as e:
        errors = e.kwargs.get("errors") or []
        why = "; ".join(str(err[3]) for err in errors) or str(e)
        raise CheckFailed(f"dns {cfg.query_name}: {where} failed: {why}", "server_error") from None
    except dns.exception.Timeout:
        raise CheckFailed(f"dns {cfg.query_name}: no answer from {where}", "timeout") from None
    except dns.exception.DNSException as e:
        raise CheckFailed(f"dns {cfg.query_name}: {where}: {e}", "error") from None
    return [rdata.address for rdata in answer]


async def probe(cfg: Config, ctx: Context) -> Observation:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    if cfg.server is None:
        answers = await _system(cfg, ctx)
    else:
        answers = await _server(cfg, *parse_server(cfg.server))
    elapsed = loop.time() - t0
    shown = ", ".join(answers[:8]) + (f" (+{len(answers) - 8} more)" if len(answers) > 8 else "")
    obs = Observation(value=elapsed, unit="seconds", detail=f"{cfg.record_type} {shown} in {elapsed * 1000:.1f} ms",
                      values=(("answers", float(len(answers)), ""),))
    missing = [a for a in cfg.expect_addresses if a not in {str(ipaddress.ip_address(x)) for x in answers}]
    if missing:
        raise CheckFailed(f"dns {cfg.query_name}: {cfg.record_type} answers {shown or '(none)'} lack "
                          f"{', '.join(missing)}", "mismatch", observation=obs)
    return obs
