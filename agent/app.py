"""Wiring and the ordered lifecycle: start, signals, reload, drain, stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import platform
import signal
import stat
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from agent import logs
from agent.config import Config, ConfigError
from agent.probes.base import Context
from agent.probes.blocking import LookupPool, StillBlocked, off_loop
from agent.runner import Runner
from agent.scheduler import Scheduler, first_samples
from agent.serving.admin_watch import AdminWatcher
from agent.serving.haproxy_agent import AgentCheckServer
from agent.serving.listener import Listener
from agent.serving.metrics import make_registry, render
from agent.serving.sdnotify import Notifier, ServiceManager
from agent.serving.weight import WeightTracker
from agent.state import AgentState
from agent.trust import check_trusted, load_trusted_config, read_secret
from agent.watch import DirWatch, config_dirs

if TYPE_CHECKING:
    from aiohttp import web

RELOAD_TIMEOUT = 5.0  # seconds a SIGHUP's config read may take before the reload is given up on
WATCH_EVERY = 1.0  # seconds between looks at the config file (one stat(), off the loop)
WATCH_SAFETY = 10.0  # the same while inotify watches it: a change wakes the watcher at once
WATCH_SETTLE = 0.25  # a change must hold this long before it is reloaded: a file being written changes again
WATCH_TIMEOUT = 1.0  # a look that takes longer (a hung mount) is given up on for this round
STOP_WAIT = 5.0  # seconds the stop waits for the background loops to end once cancelled


def file_signature(path: str) -> tuple:
    """Blocking: what the config file looks like, through its symlinks. An edit changes its size, mtime or
    ctime; a rename over it (an editor's save) and a ConfigMap update (its `..data` symlink swapped to a
    new directory) change the inode that `path` resolves to."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ("absent",)
    except OSError as e:
        return ("error", e.errno)
    if not stat.S_ISREG(st.st_mode):  # a FIFO's times move when it is read: only a new one is a change
        return ("special", st.st_dev, st.st_ino)
    return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_config_seen(path: str) -> tuple[tuple, tuple[Config, dict[str, str | None]] | ConfigError]:
    """Blocking: the file's signature, taken before the read, and what read_config() made of it."""
    seen = file_signature(path)
    try:
        return seen, read_config(path)
    except ConfigError as e:
        return seen, e


def read_config(path: str) -> tuple[Config, dict[str, str | None]]:
    """Blocking: the config file and the tokens it names, checked as at start (ConfigError)."""
    config = load_trusted_config(path)
    return config, read_tokens(config)


def read_tokens(config: Config) -> dict[str, str | None]:
    """The bearer tokens named in [server]; a file that is unreadable, empty or readable by others is a
    config error. Read at start and on SIGHUP only: a rotated token takes effect with the next reload."""
    tokens: dict[str, str | None] = {}
    for key in ("status_token_file", "admin_token_file"):
        path = getattr(config.server, key)
        if path is None:
            tokens[key.removesuffix("_token_file")] = None
            continue
        check_trusted(path, f"server.{key}")
        tokens[key.removesuffix("_token_file")] = read_secret(path, f"server.{key}")
    return tokens


def end_past_stuck_lookups(agent: Agent, code: int) -> None:
    """Called last in the agent's coroutine, once it has stopped in order: when host-name lookups may still
    be stuck, end the process now with `code` instead of waiting for them.

    A lookup on a hung resolver returns only after the resolver's timeouts (30 s and more) and cannot be
    interrupted, and both ways out wait for it: the interpreter joins the lookup pool's threads at exit,
    and uvloop's close() runs libuv until every pending getaddrinfo request in its own pool (which this
    process cannot see into) is done. Nothing is left to do by then: sockets, sessions and the service
    manager's connection are closed, and the log is flushed here.
    """
    uvloop = not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop)
    if not agent.lookups.running and not uvloop:
        return
    if agent.lookups.running:
        logs.event("exit_with_stuck_lookups", logging.WARNING, lookups=agent.lookups.running)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Agent:
    """One running agent. `start()` brings it up in order; `stop()` takes it down in reverse."""

    def __init__(self, config: Config, config_path: str | None = None, runner: Runner | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.config_path = config_path
        self.tokens = read_tokens(config)
        self.state: AgentState | None = None
        self.ctx = Context()
        self.runner = runner or Runner(self.ctx)
        self.scheduler: Scheduler | None = None
        self._sched_task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None  # the node's fleet guard, with [fleet]
        self._group_guard_tasks: dict[str, asyncio.Task[None]] = {}  # each verdict group's, with [fleet]
        self._web: Listener | None = None
        self._stop = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self.systemd = ServiceManager(notifier or Notifier(None))
        self.admin: AdminWatcher | None = None
        self.agent_check: AgentCheckServer | None = None
        self.agent_check_address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task] = []  # the admin watcher, the reloader, the config watcher, the weight sampler
        self._reload_wanted = asyncio.Event()
        self.lookups = LookupPool(32)  # the default executor, once started
        self._slots: dict[str, object] = {}  # off_loop's: the config read and the watcher's stat in flight
        self._config_seen: tuple | None = None  # the file as the last read (start or reload) saw it
        self._watch_asked: tuple | None = None  # the look the watcher last asked a reload for
        self._config_changed = asyncio.Event()  # inotify, or a reload (which may turn watching on)
        self.admin_socket: str | None = None  # the unix socket's path once it listens

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The default executor is the probes' alone: drivers (aiohttp, asyncpg, redis-py, asyncio's own
        # connect) resolve host names there, and a hung resolver holds a worker per lookup until glibc
        # gives up. This bound is what such lookups can ever hold; once it is full, further lookups queue
        # and their samples time out, so a hung resolver costs exactly the checks that resolve names. The
        # agent's own blocking work (state file reads and writes, weight samples, config reads) never runs
        # here: it goes through off_loop, a thread of its own per purpose, so drain and maintenance apply
        # whatever the probes do. The workers are daemons, so a stuck lookup does not hold up the exit.
        loop.set_default_executor(self.lookups)
        self.state = AgentState(self.config, loop.time())
        logs.set_secrets(self.config.secrets())
        self.admin = AdminWatcher(self.state)
        await self.admin.sync(force=True)  # before anything serves: maintenance survives a restart
        self._tasks.append(asyncio.create_task(self.admin.run(paced=True), name="admin-watcher"))  # see _beat
        self._start_fleet_guard()
        if self.config_path is not None:
            self._config_seen = await self._look()
            self._tasks.append(asyncio.create_task(self._watch_config(), name="config-watcher"))
        self.scheduler = Scheduler(self.state, self.runner)
        self.scheduler.on_beat = self._beat
        # The listeners bind before the first probe runs: nothing the probes do (lookups stuck on a dead
        # resolver, above all) can stand between the agent and its sockets. Until the scheduler's first
        # heartbeat every consumer hears DOWN.
        try:
            registry = make_registry(self.state, lambda: len(self.runner.hung))
            self._web = Listener(self.config.server, self.state, functools.partial(self._make_app, registry),
                                 metrics=functools.partial(render, registry))
            registry.register(self._web.guard)
            self.address = await self._web.start(*self.config.server.listen)
            await self._start_admin_socket()
            if self.config.agent_check.listen is not None:
                await self._start_agent_check(*self.config.agent_check.listen)
        except BaseException:
            await self.stop()
            raise
        self._sched_task = asyncio.create_task(self.scheduler.run(), name="scheduler")
        self._tasks.append(asyncio.create_task(self._reloader(), name="reloader"))  # a SIGHUP so far waits here
        logs.event("started", listen=f"{self.address[0]}:{self.address[1]}", checks=len(self.config.checks),
                   admin_socket=self.admin_socket,
                   agent_check=None if self.agent_check_address is None else
                   f"{self.agent_check_address[0]}:{self.agent_check_address[1]}",
                   python=platform.python_version(), loop=type(loop).__module__.partition(".")[0])

    def _make_app(self, registry: object) -> web.Application:
        """The aiohttp app: built by the listener when the first request the fast responder does not
        answer arrives (or at start with fast_health = false), with the tokens of the config then in force."""
        from agent.serving.http_api import make_app

        assert self.state is not None and self.admin is not None
        return make_app(self.state, registry, dict(self.tokens), self.admin)

    async def _start_admin_socket(self) -> None:
        """The local operators' channel. Asked for by name, a failure is a config error; the default place
        failing (no such directory, a path too long for a unix socket) is logged and the agent runs without."""
        assert self._web is not None
        path = self.config.admin_socket()
        if path is None:
            return
        try:
            await self._web.start_unix(path)
        except OSError as e:
            if self.config.server.admin_socket:
                raise ConfigError(self.config_path or "(config)", [
                    f"server.admin_socket: cannot listen on {path}: {e.strerror or e}"]) from None
            logs.event("admin_socket_unavailable", logging.WARNING, path=path, error=e.strerror or str(e))
            return
        self.admin_socket = path

    async def _start_agent_check(self, host: str, port: int) -> None:
        assert self.state is not None
        weights = WeightTracker(self.state, self.ctx.proc)
        await weights.sample()  # a first reading, so the first reply already has a weight to ramp to
        self._tasks.append(asyncio.create_task(weights.run(), name="weight"))
        self.agent_check = AgentCheckServer(self.state, weights)
        try:
            self.agent_check_address = await self.agent_check.start(host, port)
        except OSError as e:
            raise ConfigError(self.config_path or "(config)", [
                f"agent_check.listen: cannot listen on {host}:{port}: {e.strerror or e}"]) from None

    def _beat(self, now: float) -> None:
        assert self.state is not None and self.scheduler is not None
        if self.admin is not None:
            self.admin.beat(now)
        if not self.systemd.notifier.enabled:  # not under systemd: no answer to compute every beat
            return
        self.systemd.beat(now, self.state.answer(now), self.scheduler.ready.is_set())

    def request_reload(self) -> None:
        """SIGHUP: reload soon, in the reloader task. Reloads run one at a time; SIGHUPs that arrive during
        one coalesce into a single reload after it, which reads the file as it is by then."""
        self._reload_wanted.set()

    async def _reloader(self) -> None:
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in one reload must not end reloading; the old config stays
                assert self.state is not None
                self.state.reloaded(False)
                logs.event("reload_failed", logging.ERROR, file=self.config_path, errors=[repr(e)])

    async def _look(self, watch: DirWatch | None = None) -> tuple | None:
        """The config file's signature, from a thread of its own; None when the look is stuck or slow.
        With `watch`, the same thread first (re)arms it on where the file now is."""
        assert self.config_path is not None
        path = self.config_path

        def look() -> tuple:
            if watch is not None:
                watch.arm(config_dirs(path))
            return file_signature(path)

        try:
            async with asyncio.timeout(WATCH_TIMEOUT):
                return await off_loop(self._slots, "watch", look, name="config-watch")
        except (TimeoutError, StillBlocked):
            return None

    async def _watch_config(self) -> None:
        """Reload when the config file changed since it was last read, exactly as SIGHUP does.

        Woken by inotify when the file, its directory's `..data` (a ConfigMap volume) or a symlink's
        target changes, with a look every WATCH_SAFETY as a safety net; without inotify, one stat() every
        WATCH_EVERY. A change is taken once it has held for WATCH_SETTLE, and asked for once: a reload in
        progress, or one that refused this very file, is not asked for again.
        """
        changed = self._config_changed
        watch = DirWatch(changed.set)
        try:
            await self._watch_config_with(watch, changed)
        finally:
            watch.close()

    async def _watch_config_with(self, watch: DirWatch, changed: asyncio.Event) -> None:
        while True:
            try:
                quiet = watch.armed or not self.config.agent.watch_config
                async with asyncio.timeout(WATCH_SAFETY if quiet else WATCH_EVERY):
                    await changed.wait()
            except TimeoutError:
                pass
            changed.clear()
            try:
                if not self.config.agent.watch_config:
                    continue
                seen = await self._look(watch)
                if seen is None or seen == self._config_seen or seen == self._watch_asked:
                    continue
                await asyncio.sleep(WATCH_SETTLE)
                if await self._look(watch) != seen or seen == self._config_seen:  # still changing, or read meanwhile
                    continue
                self._watch_asked = seen
                logs.event("config_changed", file=self.config_path)
                self.request_reload()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad round must not end watching
                logs.event("config_watch_error", logging.ERROR, error=repr(e))

    async def reload(self) -> bool:
        """Re-read the config file. A bad file changes nothing: the old config keeps serving. A good one
        replaces it in one swap once its new and changed checks have their first samples (at most
        scheduler.warm_up_bound() after the read), so a reload takes a node out only when those say so.

        The file is read and validated off the loop (it may sit on a slow or hung mount), in a thread
        of the agent's own, for at most RELOAD_TIMEOUT; a read given up on keeps its thread, and until it
        ends every further reload fails at once instead of starting a second one beside it.
        """
        assert self.state is not None and self.scheduler is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        path = self.config_path
        try:
            if path is None:
                raise ConfigError("(none)", ["no config file to reload"])
            try:
                async with asyncio.timeout(RELOAD_TIMEOUT):
                    seen, got = await off_loop(self._slots, "config", read_config_seen, path, name="config-read")
                self._config_seen = seen
                if isinstance(got, ConfigError):
                    raise got
                config, tokens = got
            except TimeoutError:
                raise ConfigError(path, [f"reading the file took over {RELOAD_TIMEOUT:g}s (a hung mount?); "
                                         "the old config stays"]) from None
            except StillBlocked as e:
                raise ConfigError(path, [f"the read of the file started {e.stuck:.0f}s ago is still blocked; "
                                         "the old config stays"]) from None
            if self.admin is not None and config.agent.state_dir != self.config.agent.state_dir:
                problem = await self.admin.carry_over(config.agent.state_dir)
                if problem:
                    raise ConfigError(path, [problem])
        except ConfigError as e:
            self.state.reloaded(False)
            logs.event("reload_failed", logging.ERROR, file=e.source, errors=e.errors)
            return False
        if config.server.listen != self.config.server.listen:
            logs.event("reload_listen_ignored", logging.WARNING, detail="server.listen changes need a restart")
        if config.agent_check.listen != self.config.agent_check.listen:
            logs.event("reload_listen_ignored", logging.WARNING, detail="agent_check.listen changes need a restart")
        # Make before break: the new and changed checks take their first samples while the old config
        # keeps serving, and the swap below seeds their states from them. Nothing awaits between the
        # swap's steps, so no request sees half of it.
        seeds = await first_samples(self.runner, self.state.changed_checks(config))
        self.config, self.tokens = config, tokens
        if self._web is not None:
            self._web.guard.configure(config.server)
            if self._web.app is not None:
                from agent.serving.httpcommon import TOKENS

                self._web.app[TOKENS].update(tokens)
        old_fleet = self.state.config.fleet
        changed = self.state.apply_config(config, loop.time(), seeds)
        self.scheduler.reload(changed)
        if config.fleet != old_fleet:
            self._stop_fleet_guard()
            self._start_fleet_guard()
        elif config.fleet is not None and list(config.groups) != list(self.state.group_guards):
            self._sync_group_guards()
        self.state.reloaded(True)
        self._config_changed.set()  # the watcher looks again now: the reload may have turned it on
        logs.event("reloaded", file=path, changed=sorted(changed), checks=len(config.checks),
                   seconds=round(loop.time() - began, 3))
        return True

    def _start_fleet_guard(self) -> None:
        """With [fleet]: the guard's own task, and the state told to consult it (agent.serving.decision decides)."""
        assert self.state is not None
        if self.config.fleet is None:
            return
        from agent.fleet.guard import FleetGuard  # only configs with [fleet] load the store clients

        self.state.guard = FleetGuard(self.config.fleet)
        self._guard_task = asyncio.create_task(self.state.guard.run(), name="fleet-guard")
        self._tasks.append(self._guard_task)
        self._sync_group_guards()

    def _sync_group_guards(self) -> None:
        """Each verdict group has a guard of its own, with its own budget in the same store: shedding one
        group on a share of the fleet does not spend another's (agent.fleet.config.scope_group). A reload
        starts the guard of a new group and stops a removed group's; the others keep their grants."""
        from agent.fleet.guard import FleetGuard

        assert self.state is not None and self.config.fleet is not None
        tasks = self._group_guard_tasks
        for g in [g for g in tasks if g not in self.config.groups]:
            tasks.pop(g).cancel()  # awaited with the other tasks at stop
        guards: dict[str, FleetGuard] = {}
        for g in self.config.groups:
            kept = self.state.group_guards.get(g) if g in tasks else None
            if kept is None:
                kept = FleetGuard(self.config.fleet.for_verdict_group(g))
                tasks[g] = asyncio.create_task(kept.run(), name=f"fleet-guard-{g}")
                self._tasks.append(tasks[g])
            guards[g] = kept
        self._group_guard_tasks = tasks
        self.state.group_guards = guards
        views = {g: v for g, v in self.state.condition.group_guards.items() if g in guards}
        self.state.condition = replace(self.state.condition, group_guards=views)

    def _stop_fleet_guard(self) -> None:
        """A reload that changes or removes [fleet]: the old guards stop (each task closes its store)."""
        assert self.state is not None
        for task in [self._guard_task, *self._group_guard_tasks.values()]:
            if task is not None:
                task.cancel()  # awaited with the other tasks at stop
        self._guard_task = None
        self._group_guard_tasks = {}
        self.state.guard = None
        self.state.group_guards = {}
        self.state.condition = replace(self.state.condition, guard=None, group_guards={})

    def request_stop(self) -> None:
        self._stop.set()

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads; called before start(), so that a SIGTERM while the agent
        starts (a slow disk, a service manager giving up) still stops it in order instead of killing it."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain: DOWN at once, kept for shutdown_drain, then stop."""
        loop = asyncio.get_running_loop()
        if self._stop.is_set():  # asked to stop while it started: nothing was ever up to drain
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()
            return
        try:
            sched = self._sched_task
            assert sched is not None  # start() made it
            waiter = asyncio.create_task(self._stop.wait())
            await asyncio.wait({waiter, sched}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            error = sched.exception() if sched.done() and not sched.cancelled() else None
            if error is not None:
                raise error
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def drain(self) -> None:
        assert self.state is not None
        loop = asyncio.get_running_loop()
        self.state.set_stopping(loop.time())
        drain = self.config.server.shutdown_drain
        self.systemd.stopping(drain)
        logs.event("draining", seconds=drain)
        if drain:
            await asyncio.sleep(drain)

    async def stop(self) -> None:
        # Reverse of start: the agent-check listener, the HTTP server, then the background loops.
        if self.agent_check is not None:
            await self.agent_check.close()
            self.agent_check = None
        if self._web is not None:
            await self._web.stop()
            self._web = None
        if self._sched_task is not None:
            self._sched_task.cancel()
            try:
                await self._sched_task
            except asyncio.CancelledError:
                pass
            except Exception as e:
                logs.event("scheduler_failed", logging.ERROR, error=repr(e))
            self._sched_task = None
        for task in self._tasks:
            task.cancel()
        # Bounded: a background loop's own cleanup (the fleet guard closing its store connection) must not
        # hold the stop; one still running after STOP_WAIT is named in the log and left behind.
        done, pending = await asyncio.wait(self._tasks, timeout=STOP_WAIT) if self._tasks else (set(), set())
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                logs.event("task_failed", logging.ERROR, task=task.get_name(), error=repr(error))
        for task in pending:
            logs.event("task_stuck_at_stop", logging.WARNING, task=task.get_name(), seconds=STOP_WAIT)
        self._tasks.clear()
        await self.ctx.close()
        self.systemd.close()
        logs.event("stopped")
