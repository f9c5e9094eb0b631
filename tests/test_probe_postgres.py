"""postgres: auth methods, TLS, DSNs, role, replication lag and lock hangs against a real PostgreSQL."""

from __future__ import annotations

import subprocess
from urllib.parse import quote

import pytest

from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.helpers import wait_for
from tests.outage import drill, fast_check, outage
from tests.servers import PG_PASSWORD, PG_USERS, PostgresServer, _pg_bin

LOGIN = {"user": "scram_user", "password": PG_PASSWORD, "database": "postgres"}


async def sample(**keys):
    cfg = PROBES["postgres"].Config(**{"name": "p", "type": "postgres", "timeout": "2s", "interval": "3s", **keys})
    return await Runner(Context()).run(cfg)


def pg_check(name: str, server: PostgresServer, **keys) -> dict:
    """A drill check; a little more time than the others, since scram and TLS cost CPU on a busy machine."""
    return fast_check(name, type="postgres", port=server.port, interval="300ms", timeout="250ms",
                      **{**LOGIN, **keys})


@pytest.mark.parametrize("user", list(PG_USERS))
async def test_password_auth_methods(postgres_server, user: str) -> None:
    """scram-sha-256, md5 and password logins pass; a wrong password fails as `auth` without the password."""
    ok = await sample(port=postgres_server.port, user=user, password=PG_PASSWORD, database="postgres")
    assert ok.ok, ok
    assert ok.observation.detail.startswith("primary, query in ")
    bad = await sample(port=postgres_server.port, user=user, password="not-it", database="postgres")
    assert (bad.ok, bad.kind) == (False, "auth"), bad
    assert f'password authentication failed for user "{user}"' in bad.reason


async def test_tls_modes(certs, postgres_server) -> None:
    """verify-full checks chain and name against ca_file; require encrypts; disable does not."""
    on_tls = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"  # false fails the check
    port = postgres_server.port
    assert (await sample(port=port, **LOGIN, sslmode="verify-full", ca_file=certs.ca_file, query=on_tls)).ok
    assert (await sample(port=port, **LOGIN, sslmode="require", query=on_tls)).ok
    plain = await sample(port=port, **LOGIN, sslmode="disable", query=on_tls)
    assert (plain.ok, plain.kind, plain.reason) == (False, "query", f"postgres 127.0.0.1:{port}: query returned false")
    untrusted = await sample(port=port, **LOGIN, sslmode="verify-full", ca_file=certs.issue()[0])
    assert (untrusted.ok, untrusted.kind) == (False, "tls"), untrusted


async def test_dsn_and_unix_socket(postgres_server) -> None:
    """A DSN with a percent-encoded password works, and so does a unix socket directory as host."""
    dsn = f"postgresql://scram_user:{quote(PG_PASSWORD, safe='')}@127.0.0.1:{postgres_server.port}/postgres"
    assert (await sample(dsn=dsn)).ok
    assert (await sample(host=postgres_server.socket_dir, port=postgres_server.port, user="postgres")).ok


async def test_promoted_standby_takes_node_down_and_back(start_agent, postgres_server, postgres_standby) -> None:
    """role = standby fails once the standby is promoted, and passes again on a rebuilt standby."""
    check = pg_check("db-role", postgres_standby, role="standby")
    agent = await start_agent(drill(check))
    rebuilt: list[PostgresServer] = []

    def rebuild() -> None:
        postgres_standby.stop()
        rebuilt.append(postgres_server.standby(port=postgres_standby.port))

    try:
        await outage(agent, check, lambda: postgres_standby.sql("SELECT pg_promote()"), rebuild,
                     "server is a primary, expected a standby")
    finally:
        for server in rebuilt:
            server.cleanup()


async def test_replication_lag_takes_node_down_and_back(start_agent, postgres_server, postgres_standby) -> None:
    """A standby whose replay falls behind max_replication_lag is DOWN, and UP once it catches up."""
    postgres_server.sql("CREATE TABLE IF NOT EXISTS beat (t timestamptz); INSERT INTO beat VALUES (now())")
    wait_for(lambda: postgres_standby.sql("SELECT count(*) FROM beat") != "0", what="replayed")
    check = pg_check("db-lag", postgres_standby, role="standby", max_replication_lag="200ms")
    agent = await start_agent(drill(check))

    def fall_behind() -> None:
        postgres_standby.sql("SELECT pg_wal_replay_pause()")
        postgres_server.sql("INSERT INTO beat VALUES (now())")  # received, not replayed

    down, _ = await outage(agent, check, fall_behind, lambda: postgres_standby.sql("SELECT pg_wal_replay_resume()"),
                           "replication lag")
    lag = dict((s, v) for s, v, _ in agent.state.states["db-lag"].last.observation.values)
    assert lag["replication_lag"] == 0.0


async def test_stopped_server_takes_node_down_and_back(start_agent, postgres_standby) -> None:
    """A stopped PostgreSQL makes the node DOWN (`connection refused`) in time, and a restarted one UP."""
    check = pg_check("db", postgres_standby)
    agent = await start_agent(drill(check))
    await outage(agent, check, postgres_standby.stop, postgres_standby.start, "connection refused")


async def test_lock_hang_takes_node_down_and_leaves_no_backends(start_agent, postgres_server) -> None:
    """A query stuck behind a lock times out (node DOWN); abandoned samples leave no backends piling up."""
    postgres_server.sql("CREATE TABLE IF NOT EXISTS locked (id int); GRANT SELECT ON locked TO scram_user")
    check = pg_check("db-lock", postgres_server, query="SELECT count(*) FROM locked")
    agent = await start_agent(drill(check))
    holder: list[subprocess.Popen] = []
    count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'healthgate'"

    def lock() -> None:
        p = subprocess.Popen([_pg_bin("psql"), "-X", "-q", "-h", postgres_server.socket_dir, "-p",
                              str(postgres_server.port), "-U", "postgres", "-d", "postgres"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        p.stdin.write("BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE; SELECT 1;\n")
        p.stdin.flush()
        holder.append(p)
        wait_for(lambda: postgres_server.sql("SELECT count(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' "
                                             "AND relation = 'locked'::regclass") == "1", what="lock held")

    def unlock() -> None:
        # Many samples were abandoned while the lock was held; the server has ended their queries.
        wait_for(lambda: int(postgres_server.sql(count)) <= 1, timeout=5, what="no healthgate backends left")
        holder[0].communicate("ROLLBACK;\n", timeout=10)

    await outage(agent, check, lock, unlock, "timeout")
