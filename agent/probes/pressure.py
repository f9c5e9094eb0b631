"""pressure: Linux pressure stall information (PSI) for cpu, memory or io stays under avg10/avg60/avg300 bounds."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import kernel_read
from agent.probes.procfs import parse_pressure

WINDOWS = ("avg10", "avg60", "avg300")


class Config(CheckBase):
    type: Literal["pressure"]
    resource: Literal["cpu", "memory", "io"]
    stall: Literal["some", "full"] = Field(
        default="some", description="some: at least one task stalled; full: all non-idle tasks stalled at once"
    )
    max_avg10: float | None = Field(default=None, ge=0, le=100, description="percent of the last 10 s stalled")
    max_avg60: float | None = Field(default=None, ge=0, le=100, description="percent of the last 60 s stalled")
    max_avg300: float | None = Field(default=None, ge=0, le=100, description="percent of the last 300 s stalled")

    @model_validator(mode="after")
    def _usable(self) -> Config:
        if self.max_avg10 is None and self.max_avg60 is None and self.max_avg300 is None:
            raise ValueError("set max_avg10, max_avg60 or max_avg300 (the percent of time stalled that fails)")
        if self.resource == "cpu" and self.stall == "full":
            raise ValueError('stall: "full" is always 0 for cpu at the system level (Linux reports it only '
                             'for cgroups); use "some"')
        return self

    def limits(self) -> list[tuple[str, float]]:
        return [(w, limit) for w in WINDOWS if (limit := getattr(self, f"max_{w}")) is not None]

    def threshold(self) -> str:
        return ", ".join(f"{self.resource} {self.stall} {w} <= {limit:g}%" for w, limit in self.limits())

    def preflight(self, proc: Path = Path("/proc")) -> tuple[str, ...]:
        path = proc / "pressure" / self.resource
        if not path.exists():
            return (f"this kernel has no PSI ({path} missing): the check will fail on this host",)
        return ()


def read_pressure(proc: Path, resource: str) -> dict[str, dict[str, float]]:
    """/proc/pressure/<resource> as {"some": {"avg10": ...}, "full": {...}}."""
    path = proc / "pressure" / resource
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckFailed(f"pressure: this kernel has no PSI ({path} missing; needs Linux 4.20+ "
                          "built with CONFIG_PSI)", "unsupported") from None
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            raise CheckFailed("pressure: PSI is disabled in this kernel (boot it with psi=1)",
                              "unsupported") from None
        raise
    return parse_pressure(text)


async def probe(cfg: Config, ctx: Context) -> Observation:
    lines = await kernel_read(ctx, cfg.name, "pressure", (f"pressure/{cfg.resource}",), read_pressure, ctx.proc,
                              cfg.resource)
    if cfg.stall not in lines:
        raise CheckFailed(f"pressure: this kernel reports no {cfg.stall!r} line for {cfg.resource}", "unsupported")
    avg = lines[cfg.stall]
    label = f"{cfg.resource} {cfg.stall}"
    obs = Observation(
        value=avg["avg10"],
        unit="percent",
        detail=f"{label}: " + " ".join(f"{w}={avg[w]:g}%" for w in WINDOWS),
        values=tuple((w, avg[w], "percent") for w in WINDOWS[1:]),
    )
    over = [f"{w} {avg[w]:g}% > {limit:g}%" for w, limit in cfg.limits() if avg[w] > limit]
    if over:
        raise CheckFailed(f"pressure {label}: " + ", ".join(over), "threshold", observation=obs)
    return obs
