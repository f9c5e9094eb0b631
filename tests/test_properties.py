"""Properties (hypothesis): the verdict honours rise, fall and flap damping for any sequence of results,
and the config loader turns any TOML into a Config or a ConfigError, never anything else."""

from __future__ import annotations

import datetime
import json
import math
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, PolicyConfig, load_config, parse_config
from agent.model import CheckState, Result, Status
from agent.probes import PROBES
from agent.probes.tcp import Config as TcpConfig
from agent.verdict import aggregate, next_state, view

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def scenarios(draw):
    """A check, a policy and a timed sequence of pass/fail samples taken about every interval."""
    interval = draw(st.sampled_from([0.1, 0.5, 1.0, 2.0]))
    chk = TcpConfig(name="c", type="tcp", port=1, interval=interval, timeout=interval / 2,
                    rise=draw(st.integers(1, 5)), fall=draw(st.integers(1, 5)))
    policy = PolicyConfig(flap_threshold=draw(st.integers(0, 4)), flap_window=draw(st.sampled_from([1, 5, 20, 60])),
                          flap_hold=draw(st.sampled_from([0, 1, 3, 10])))
    # Runs of passes and failures, so long streaks (rise, fall, hold) occur as well as alternation.
    runs = draw(st.lists(st.tuples(st.booleans(), st.integers(1, 25)), max_size=25))
    oks = [ok for ok, n in runs for _ in range(n)]
    steps = draw(st.lists(st.floats(0.9, 1.1), min_size=len(oks), max_size=len(oks)))
    return chk, policy, oks, steps


def fold(chk, policy, oks, steps):
    """(time, ok, state after) for each sample."""
    state, now, out = CheckState(), 0.0, []
    for ok, step in zip(oks, steps, strict=True):
        now += chk.interval * step
        state = next_state(state, Result(ok, "" if ok else "boom", "ok" if ok else "failed", 0.0, now, now, 0.0),
                           chk, policy, now, 0.0)
        out.append((now, ok, state))
    return out


def run_length(oks: list[bool], end: int, value: bool) -> int:
    n = 0
    while end - n >= 0 and oks[end - n] is value:
        n += 1
    return n


@SETTINGS
@given(scenarios())
def test_never_up_after_fall_failures(scenario) -> None:
    """A check is never UP when its last `fall` samples failed (or all of them, if fewer)."""
    chk, policy, oks, steps = scenario
    for i, (_, _, state) in enumerate(fold(chk, policy, oks, steps)):
        if run_length(oks, i, False) >= min(chk.fall, i + 1):
            assert state.status is not Status.UP, (oks[: i + 1], state)


@SETTINGS
@given(scenarios())
def test_transitions_respect_rise_fall_and_damping(scenario) -> None:
    """Up only after >= rise passes in a row (>= the hold-down's count once flapping), down only after
    `fall` failures in a row or flap_threshold flaps within flap_window; and each as soon as it is due."""
    chk, policy, oks, steps = scenario
    hold = max(chk.rise, math.ceil(policy.flap_hold / chk.interval))
    flaps: list[float] = []  # times of failures that followed a pass
    held = False  # the reference model's own idea of a hold-down
    prev = CheckState()
    for i, (t, ok, state) in enumerate(fold(chk, policy, oks, steps)):
        if not ok and i > 0 and oks[i - 1]:
            flaps.append(t)
        flapping = bool(policy.flap_threshold) and len([f for f in flaps if t - f < policy.flap_window]) \
            >= policy.flap_threshold
        if not ok and flapping:
            held = True
        passes = run_length(oks, i, True)
        need = hold if held else chk.rise
        if state.status is Status.UP and prev.status is not Status.UP:
            assert ok and passes >= need, (oks[: i + 1], need)
            held = False
        if state.status is not Status.UP and prev.status is Status.UP:
            assert not ok and (run_length(oks, i, False) >= chk.fall or flapping), oks[: i + 1]
        if ok and passes >= need and prev.status is not Status.UP:
            assert state.status is Status.UP, (oks[: i + 1], need, state)
        if not ok and prev.status is Status.UP and (run_length(oks, i, False) >= chk.fall or flapping):
            assert state.status is Status.DOWN, (oks[: i + 1], flapping)
        prev = state


@SETTINGS
@given(st.lists(st.tuples(scenarios(), st.booleans()), min_size=1, max_size=4))
def test_node_never_up_while_a_critical_check_failed_fall_times(checks) -> None:
    """The node verdict is never UP while any critical check's last `fall` samples failed."""
    views, must_be_down, latest = [], False, 0.0
    for n, ((chk, policy, oks, steps), critical) in enumerate(checks):
        chk = chk.model_copy(update={"name": f"c{n}", "critical": critical})
        folded = fold(chk, policy, oks, steps)
        state = folded[-1][2] if folded else CheckState()
        now = folded[-1][0] if folded else 0.0
        views.append(view(chk, state, policy))
        latest = max(latest, now)
        if critical and (not oks or run_length(oks, len(oks) - 1, False) >= min(chk.fall, len(oks))):
            must_be_down = True
    if must_be_down:
        assert not aggregate(views, latest).up



def _check_dicts(draw, names):
    """Checks for a config: the first is critical (a config needs one), the others may or may not be."""
    return [{"name": n, "type": "tcp", "port": 1, "interval": draw(st.sampled_from([0.2, 1.0, 3.0])),
             "timeout": 0.1, "rise": draw(st.integers(1, 3)), "fall": draw(st.integers(1, 3)),
             "critical": i == 0 or draw(st.booleans())} for i, n in enumerate(names)]


@st.composite
def histories(draw):
    """A config and a sequence of results, heartbeats and reloads, with time moving forward."""
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=5, unique=True))
    checks = _check_dicts(draw, names)
    ops = []
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["result", "result", "result", "tick", "reload"]))
        dt = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0, 4.0]))
        if kind == "result":
            ops.append(("result", dt, draw(st.sampled_from("abcdef")), draw(st.booleans())))
        elif kind == "tick":
            ops.append(("tick", dt))
        else:
            new = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=5, unique=True))
            ops.append(("reload", dt, _check_dicts(draw, new)))
    return checks, ops


@SETTINGS
@given(histories())
def test_incremental_verdict_equals_the_full_recomputation(history) -> None:
    """The verdict AgentState keeps incrementally (verdict.Tally) equals aggregate() over every check's
    latest view, after any sequence of results, heartbeats and reloads."""
    from agent.state import AgentState

    checks, ops = history
    base = {"agent": {"allow_root": True}, "policy": {"flap_threshold": 0, "stale_grace": 0.5}}
    state = AgentState(parse_config({**base, "checks": checks}), 0.0)
    now = 0.0
    for op in ops:
        now += op[1]
        if op[0] == "result":
            ok = op[3]
            state.record(op[2], Result(ok, "" if ok else "boom", "ok" if ok else "failed", 0.01, now, now, 0.0), now)
        elif op[0] == "tick":
            state.tick(now, 0.0)
        else:
            state.apply_config(parse_config({**base, "checks": op[2]}), now)
        policy = state.config.policy
        at = state.snapshot.computed_at  # a result for a check the config no longer has refreshes nothing
        full = aggregate([view(c, state.states[n], policy) for n, c in state.checks.items()], at)
        assert state.snapshot.verdict == full, op
        assert state.snapshot.checks == tuple(view(c, state.states[n], policy) for n, c in state.checks.items())


# -- the config loader --------------------------------------------------------------------------------

KEYS = ["server", "agent", "policy", "agent_check", "checks", "listen", "name", "type", "interval", "timeout",
        "fall", "rise", "critical", "port", "host", "url", "path", "jitter", "fast_interval", "max_connections",
        "read_timeout", "flap_window", "flap_threshold", "allow_root", "expect_status", "headers", "method",
        "status_token_file", "drain_status", "max_used_percent", "min_free_percent", *PROBES]
scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["1s", "500ms", "-1s", "1e400", "0", "nan", "x:99999", ":0", "[::1]:80",
                                           "127.0.0.1:8080", "tcp", "http", "GET", "/", "http://[::1", "9" * 400]),
    st.dates(), st.datetimes(), st.times(),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=5)),
    max_leaves=15,
)
documents = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
    st.one_of(junk, st.lists(st.dictionaries(st.sampled_from(KEYS), junk, max_size=8), max_size=3)),
    max_size=6,
)


def toml_value(v) -> str:
    """Inline TOML for a Python value (every document here is one key = value line per top-level key)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # nan, inf, -inf and 1e+100 are TOML too
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def assert_only_config_errors(load) -> None:
    try:
        load()
    except ConfigError as e:
        assert e.errors and all(isinstance(line, str) and line for line in e.errors), e.errors


@settings(SETTINGS, max_examples=100)
@given(documents)
def test_loader_raises_only_config_errors_on_any_document(tmp_path: Path, doc: dict) -> None:
    """Any TOML document, however wrong, loads or raises ConfigError with one line per problem."""
    text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items())
    f = tmp_path / "c.toml"
    f.write_text(text)
    assert_only_config_errors(lambda: load_config(f))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    assert_only_config_errors(lambda: parse_config(data))


@SETTINGS
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_loader_raises_only_config_errors_on_any_bytes(tmp_path: Path, content) -> None:
    """Arbitrary text or bytes in the file are a ConfigError, never a crash."""
    f = tmp_path / "c.toml"
    f.write_bytes(content.encode("utf-8", "replace") if isinstance(content, str) else content)
    assert_only_config_errors(lambda: load_config(f))


@SETTINGS
@given(st.text(alphabet=st.characters(), max_size=80))
def test_one_line_skips_the_character_walk_only_when_it_would_change_nothing(text: str) -> None:
    """one_line() leaves the per-character escape out for text str.isprintable() accepts: the result is the
    same as escaping every character, for any text (controls, format characters, separators, surrogates)."""
    import re

    from agent.text import REASON_MAX, one_line, printable

    walked = printable(re.sub(r"\s+", " ", text)).strip()
    walked = walked if len(walked) <= REASON_MAX else walked[: REASON_MAX - 3].rstrip() + "..."
    assert one_line(text) == walked


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["MemTotal", "MemFree", "MemAvailable", "Buffers", "SwapTotal",
                                           "SwapFree", "HugePages_Total"]),
                          st.integers(0, 2**40), st.sampled_from([" kB", ""])), max_size=7, unique_by=lambda t: t[0]),
       st.sampled_from([frozenset({"MemTotal", "MemFree", "MemAvailable"}), frozenset({"SwapTotal", "SwapFree"})]))
def test_a_keyed_meminfo_read_equals_the_full_read_cut_to_its_keys(tmp_path_factory, lines, keys) -> None:
    """read_meminfo(proc, keys) stops after the last wanted line: it returns the full read's entries for
    those keys, in any order of the lines, with some of them missing."""
    from agent.probes.memory import read_meminfo

    proc = tmp_path_factory.mktemp("proc")
    (proc / "meminfo").write_text("".join(f"{k}: {v}{unit}\n" for k, v, unit in lines))
    assert read_meminfo(proc, keys) == {k: v for k, v in read_meminfo(proc).items() if k in keys}
