"""`healthgate fleet status` lists a real store's members: serving, shed and why, held, silent."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.fleet.backends import open_store
from agent.fleet.store import Report
from tests.fleet import StoreServer, fleet_config
from tests.helpers import wait_for
from tests.test_fleet_guard import store  # noqa: F401 - the parametrised store fixture

pytestmark = pytest.mark.e2e


async def populate(url: str) -> None:
    """a serves, b and c fail for db (one shed, one held: d's fault and b's grant spend max_down 2 of 5), d has a local fault, e goes silent."""
    now = time.time()
    stores = {n: open_store(fleet_config(url, node=n, max_down=2, size=5)) for n in "abcde"}
    try:
        # A new group grants nothing for one ttl: everyone beats until b has its grant, then c asks too.
        for _ in range(200):
            for n in "ae":
                await stores[n].beat(Report(n, "up", (), now))
            await stores["c"].beat(Report("c", "up", (), now))
            await stores["d"].beat(Report("d", "down", ("disk",), now))
            if (await stores["b"].acquire(Report("b", "shed", ("db",), now))).status == "shed":
                break
            await asyncio.sleep(0.05)
        assert (await stores["c"].acquire(Report("c", "shed", ("db",), now))).status == "held"
    finally:
        for s in stores.values():
            await s.close()


MEM = '[agent]\nallow_root = true\n[[checks]]\nname = "mem"\ntype = "memory"\n'  # tests run as root


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(f'[fleet]\nstore = "{url}"\ngroup = "g"\nnode = "a"\nmax_down = 2\nsize = 5\n'
                    'heartbeat = "250ms"\nttl = "2s"\ntimeout = "200ms"\n' + MEM)
    return path


def test_fleet_status_lists_every_kind_of_member(store: StoreServer, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Each member appears once with its status in words and its reasons; a member that stopped beating
    is `silent`; the header gives expected, serving and the budget; --json carries the same."""
    asyncio.run(populate(store.url))
    path = write_config(tmp_path, store.url)

    def table() -> str:
        assert cli.main(["fleet", "status", "-c", str(path)]) == 0
        return capsys.readouterr().out

    # Nobody beats again: after ttl every member is silent; before that, the statuses are as written.
    out = table()
    assert "5 expected, 3 serving, at most 2 may be down" in out, out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert rows["a"].split()[1] == "serving" and rows["a"].split()[2].endswith("s")
    assert rows["b"].split()[1] == "shed" and "db" in rows["b"]
    assert rows["c"].split()[1] == "held" and "db" in rows["c"]
    assert rows["d"].split()[1] == "down" and "disk" in rows["d"]
    out = wait_for(lambda: (o := table()).count("silent") == 5 and o, timeout=10, what="all silent")
    assert "stopped heartbeating" in out and "(last: shed)" in out
    assert cli.main(["fleet", "status", "-c", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["expected"] == 5 and {m["node"] for m in doc["members"]} == set("abcde")


def test_fleet_status_without_fleet_or_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No [fleet] table: exit 2 in words; a store that does not answer: exit 3 in words, no traceback."""
    path = tmp_path / "none.toml"
    path.write_text(MEM)
    assert cli.main(["fleet", "status", "-c", str(path)]) == 2
    assert "no [fleet] table" in capsys.readouterr().err
    path.write_text('[fleet]\nstore = "redis://127.0.0.1:1/0"\n' + MEM)
    assert cli.main(["fleet", "status", "-c", str(path), "--timeout", "1"]) == 3
    err = capsys.readouterr().err
    assert "fleet store redis://127.0.0.1:1/0" in err and "Traceback" not in err
