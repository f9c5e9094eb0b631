"""load: the 1-, 5- or 15-minute load average divided by the number of CPUs stays under a bound."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import kernel_read
from agent.probes.procfs import parse_loadavg, read_cpu


class Config(CheckBase):
    type: Literal["load"]
    max_per_cpu: float = Field(default=2.0, gt=0, description="load average per CPU above this fails")
    minutes: Literal[1, 5, 15] = Field(default=1, description="which load average: 1, 5 or 15 minutes")

    @field_validator("minutes", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: object) -> object:
        if isinstance(v, bool):  # true == 1 to Python, not to TOML or the schema
            raise ValueError("must be 1, 5 or 15, not a boolean")
        return v

    def threshold(self) -> str:
        return f"load{self.minutes} per CPU <= {self.max_per_cpu:g}"


def read_load(proc: Path) -> tuple[tuple[float, float, float], int]:
    loads = parse_loadavg((proc / "loadavg").read_text())
    _, cpus = read_cpu(proc)
    return loads, cpus


async def probe(cfg: Config, ctx: Context) -> Observation:
    loads, cpus = await kernel_read(ctx, cfg.name, "load", ("loadavg", "stat"), read_load, ctx.proc)
    load = loads[{1: 0, 5: 1, 15: 2}[cfg.minutes]]
    per_cpu = round(load / cpus, 3)
    obs = Observation(
        value=per_cpu,
        unit="per_cpu",
        detail=f"load{cfg.minutes} {load:g} on {cpus} CPU(s) = {per_cpu:g} per CPU",
        values=(("load1", loads[0], ""), ("load5", loads[1], ""), ("load15", loads[2], ""),
                ("cpus", float(cpus), "")),
    )
    if per_cpu > cfg.max_per_cpu:
        raise CheckFailed(f"load: load{cfg.minutes} {load:g} on {cpus} CPU(s) = {per_cpu:g} per CPU "
                          f"> {cfg.max_per_cpu:g}", "threshold", observation=obs)
    return obs
