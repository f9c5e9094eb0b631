"""`python -m bench.run`: every benchmark in one run, side by side; prints the table, writes RESULTS.md."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import deps, detect, firstrun, fleet, footprint, junk, lag, profile, report, scale, serve
from bench.core import Ctx, Section
from bench.servers import BenchError, Servers

HERE = Path(__file__).resolve().parent
SECTIONS = {"serve": serve, "deps": deps, "detect": detect, "footprint": footprint, "lag": lag, "scale": scale,
            "profile": profile, "fleet": fleet, "junk": junk, "firstrun": firstrun}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a short smoke run: 1 repetition, short windows")
    p.add_argument("--only", action="append", choices=list(SECTIONS), help="run only these sections (repeatable)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds of each wrk run (default 5; --quick 1)")
    p.add_argument("--window", type=float, help="seconds of each footprint/lag window (default 20; --quick 3)")
    p.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md, results.json and results.png go")
    p.add_argument("--keep", action="store_true", help="keep the servers' temporary directory (logs)")
    return p.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through Servers, which stops every server it started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)  # also when started in the background, where SIGINT is ignored
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 5.0)
    window = args.window or (3.0 if args.quick else 20.0)
    chosen = args.only or list(SECTIONS)
    meta = {"started": report.stamp(), "mode": "quick (smoke run, not for quoting)" if args.quick else "full",
            "repetitions": str(reps), "wrk run": f"{duration:g} s", "window": f"{window:g} s",
            "load average before": report.loadavg()}
    sections: list[Section] = []
    t0 = time.monotonic()
    try:
        with Servers(keep=args.keep) as servers:
            ctx = Ctx(servers, args.quick, reps, duration, window)
            ctx.log(f"servers in {servers.dir}")
            ctx.nginx = servers.nginx(workers=1)
            ctx.redis = servers.redis()
            ctx.postgres = servers.postgres()
            for name in chosen:
                ctx.log(f"section {name}")
                try:
                    sections.append(SECTIONS[name].run(ctx))
                except BenchError as e:  # a missing tool or a server that won't start: the others still run
                    ctx.log(f"section {name} not run: {e}")
                    sections.append(Section(name, f"Not run: {e}"))
                except Exception as e:  # a bug in one section must not lose the others' results
                    ctx.log(f"section {name} failed: {traceback.format_exc()}")
                    sections.append(Section(name, f"Failed: {type(e).__name__}: {e}"))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    meta["load average after"] = report.loadavg()
    meta["took"] = f"{time.monotonic() - t0:.0f} s"
    info = report.machine()
    args.out.mkdir(parents=True, exist_ok=True)
    why_no_plot = report.plot(sections, args.out / "results.png")
    notes = NOTES + ("\n\n![benchmarks](results.png)" if why_no_plot is None else f"\n\n(No plot: {why_no_plot}.)")
    text = report.render(sections, info, meta, notes)
    (args.out / "RESULTS.md").write_text(text)
    report.write_json(sections, info, meta, args.out / "results.json")
    print(text)
    return 0


NOTES = """\
How the servers are set up, and why:

- **nginx** runs `worker_processes 1`: healthgate serves from one event-loop thread, so one nginx worker is
  the like-for-like ceiling on this machine (more workers would measure core count, not the server).
  Its answer is `return 200 "up\\n"`, access log off.
- **healthgate** runs its default config (`config/healthgate.toml`: a memory and a disk check) with
  `--loop uvloop` (what `auto` picks when uvloop is installed), and again with `--loop asyncio`, and
  again with `fast_health = false` (every request through aiohttp) to show what the fast responder buys.
- **naive** is `bench/naive.py`: an aiohttp `/health` that pings the same Redis and PostgreSQL inline on
  every request (redis-py and an asyncpg pool of 10), as many services do.
- wrk uses one thread, so the client needs one core and the server gets the other. Processes are not
  pinned: pinning client and server to different cores raised 1-connection p99 for every server alike on
  this virtual machine (cross-core wake-ups).
- Numbers from a machine that runs other work at the same time are noisy: compare ratios and look at the
  load average above before trusting an absolute figure.

Where the memory and the wake-ups of an idle agent go (default config; measured by hand with
`python -X importtime`, tracemalloc, /proc/PID/smaps and a count of the event loop's callbacks per second
under `--loop asyncio`; the Footprint section below repeats the import stages in every run):

- **Memory.** A bare asyncio process is 20 MB of RSS (the interpreter 10.6 MB; `import asyncio` +9.4 MB,
  most of it OpenSSL's libcrypto, which asyncio's ssl support loads). aiohttp (client and web) adds about
  16 MB, pydantic and its compiled core about 6 MB, prometheus_client 1 MB. Before this change the agent
  imported all 17 probe modules and built the pydantic schema of every check type at start: about 8 MB of
  code objects and validators, whatever the config. Now a config loads the probe modules of the types it
  names (2 for the default config) and builds the union of those models only: about 3 MB less. What is
  left is dominated by code objects of imported modules (tracemalloc: 7.7 MB of the 17 MB of Python
  allocations after the imports are module code) and by shared libraries (libpython 5 MB, pydantic-core
  4 MB, libcrypto 4 MB resident).
- **Wake-ups.** Idle, the loop ran about 12.6 timer callbacks a second (the heartbeat's 10, the state-file
  look's 2, the two checks' sleeps) and 2.7 thread hand-backs (the state-file stat, the memory and disk
  samples). Each thread hand-back used to start a new thread; the fast responder swept every second with
  no connection open; every heartbeat recomputed the verdict and the answer, and computed an answer for
  a systemd that was not there. Now: the slot threads are kept, the sweep runs only while connections are
  open, a heartbeat with nothing due restamps the snapshot, and the state-file look rides on the heartbeat's
  wake-up (17 wake-ups/s of the main thread instead of 28 to 29). The heartbeat itself stays every 100 ms:
  consumers are told DOWN when it is older than `max_loop_lag`, so it is what lets a stall be seen.
  Measured side by side after that (CPU per thread from schedstat, 20 s windows): the agent was 2.0× the bare
  loop, and 1.5× with its timed file looks turned off, so those looks (a stat() in a thread twice a second
  for the state file, once a second for the config: a thread hand-off and an extra loop wake-up each) were a
  third of its idle CPU. Now inotify wakes the watchers when a file changes and the timed looks are a 10 s
  safety net; a check's next sample, seconds away, starts on the heartbeat's wake-up instead of a timer of
  its own (at most one beat early, never late); and the memory check's /proc/meminfo is read on the loop
  when the kernel's procfs serves it (no thread hand-off). About 11 wake-ups/s of the main thread remain,
  10 of them the heartbeat's.
- **The cost of a wake-up.** With the wake-ups as few as the bare process's, what is left is the Python
  each one runs: perf (`perf record -e cpu-clock`) puts 70 to 80% of both processes' idle CPU in
  libpython, and on this virtual machine a bare asyncio wake-up after 100 ms asleep costs about 0.25 ms
  of CPU, ten times what the same code costs run hot in a loop: whatever a beat or a sample runs is paid at
  that rate. Measured by turning parts off (checks at 60 s; the memory check alone): the heartbeat was
  about 0.2× of the bare process on top of it and the two checks' samples (0.7 a second) about 0.25×,
  about 0.8 ms of CPU per memory sample in place against 0.2 ms hot. Now each beat is a timer callback that
  schedules the next (no future, task step and coroutine resumption of `asyncio.sleep()` per beat), the
  memory check parses the three lines of /proc/meminfo it reads instead of all 55, a reason or detail
  already printable skips the per-character escape (`str.isprintable()`), and the paths of /proc files are
  joined once: the default config went from 1.43× to 1.27× in the same side-by-side measurement.
- **Scale.** With thousands of checks down at once (every check starts down) the incremental verdict
  still sorted every failing check on each result: 64% of the agent's time at 2,000 checks, which never
  came up. The failing checks are now kept sorted by config position, one bisect per change; and the first
  round of samples is spread over up to the interval (at most 1,000 first samples a second), so 2,000
  checks do not connect in the same 100 ms, run late, fail as timeouts and mark themselves flapping."""


if __name__ == "__main__":
    sys.exit(main())
