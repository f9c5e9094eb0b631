"""deploy/prometheus with the real promtool and a real Prometheus scraping a running agent."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, agent_toml, free_port, http_get, require, wait_for

DEPLOY = ROOT / "deploy" / "prometheus"

AGENT = agent_toml() + """
[[checks]]
name = "mem"
type = "memory"
interval = "200ms"
timeout = "100ms"
rise = 1
max_used_percent = 100
[[checks]]
name = "root"
type = "disk"
path = "/"
interval = "200ms"
timeout = "100ms"
rise = 1
min_free_percent = 0
fail_read_only = false
[[checks]]
name = "dep"
type = "tcp"
port = %d
interval = "200ms"
timeout = "100ms"
rise = 1
fall = 1
"""


def promtool(*args: str, stdin: str | None = None, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool", "prometheus"), *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def without_kubernetes_sd(config: dict, labels: list[dict[str, str]]) -> dict:
    """The Kubernetes job with its pod discovery replaced by static targets that carry the same __meta_
    labels. Debian's Prometheus is built without the Kubernetes SD, and there is no API server here;
    the relabelling under test is exactly the deployed one."""
    job = config["scrape_configs"][0]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": [labels_.pop("__address__")], "labels": labels_} for labels_ in labels]
    return config


def pod(ip: str, port: int, scrape: str = "true", **extra: str) -> dict[str, str]:
    """The labels Kubernetes pod discovery gives a DaemonSet pod (its container port is not the scrape port)."""
    return {
        "__address__": f"{ip}:1", "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "healthgate",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
        "__meta_kubernetes_pod_node_name": "node-a", "__meta_kubernetes_namespace": "healthgate",
        "__meta_kubernetes_pod_name": "healthgate-x1", **extra,
    }


def test_promtool_check_config(tmp_path: Path) -> None:
    """`promtool check config` accepts the static scrape config and the Kubernetes one (its pod discovery
    swapped for static targets: Debian's promtool does not know kubernetes_sd_configs)."""
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: prometheus.yml is valid" in proc.stdout and "SUCCESS: 8 rules found" in proc.stdout
    shutil.copy(DEPLOY / "healthgate.rules.yml", tmp_path)
    k8s = yaml.safe_load((DEPLOY / "prometheus-kubernetes.yml").read_text())
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(without_kubernetes_sd(k8s, [pod("10.0.0.7", 8080)])))
    proc = promtool("check", "config", "k8s.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the alert rules, with no lint findings."""
    proc = promtool("check", "rules", "healthgate.rules.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout
    names = [r["alert"] for g in yaml.safe_load((DEPLOY / "healthgate.rules.yml").read_text())["groups"]
             for r in g["rules"]]
    assert names == ["HealthgateNodeDown", "HealthgateFlapping", "HealthgateCheckFailing", "HealthgateAgentStalled",
                     "HealthgateAgentDown", "HealthgateConfigReloadFailed", "HealthgateAgentAbsent",
                     "HealthgateFleetHolding"]


def test_promtool_test_rules() -> None:
    """The rules' unit tests pass: node down (not when drained), flapping, a failing check, stalled, a refused
    reload, absent, nodes held up by the fleet guard (not one shed, not a one-minute blip)."""
    proc = promtool("test", "rules", "rules_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = {t["alertname"] for g in yaml.safe_load((DEPLOY / "rules_test.yml").read_text())["tests"]
              for t in g["alert_rule_test"]}
    assert tested == {"HealthgateNodeDown", "HealthgateFlapping", "HealthgateCheckFailing",
                      "HealthgateAgentStalled", "HealthgateAgentDown", "HealthgateConfigReloadFailed",
                      "HealthgateAgentAbsent", "HealthgateFleetHolding"}


def test_promtool_check_metrics_on_live_output(agent_process, dependency) -> None:
    """`promtool check metrics` finds nothing to lint in a running agent's /metrics, failures included."""
    agent = agent_process(AGENT % free_port())
    wait_for(lambda: 'reason="refused"' in agent.get("/metrics")[1], what="a failure counted")
    body = agent.get("/metrics")[1]
    for family in ("healthgate_check_value", "healthgate_check_duration_seconds_bucket",
                   "healthgate_check_failures_total", "healthgate_transitions_total", "process_cpu_seconds_total"):
        assert family in body
    proc = promtool("check", "metrics", stdin=body)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def query(base: str, promql: str) -> list[dict]:
    code, body = http_get(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert code == 200, body
    return json.loads(body)["data"]["result"]


def values(base: str, promql: str) -> dict[str, str]:
    return {r["metric"].get("job", ""): r["value"][1] for r in query(base, promql)}


@pytest.fixture
def prometheus(tmp_path: Path):
    """Start a real Prometheus from a config dict on a free loopback port; stopped at teardown."""
    binary = require("prometheus", "prometheus")
    procs: list[subprocess.Popen] = []

    def start(config: dict) -> str:
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT))
        log.close()
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: procs[-1].poll() is not None or http_get(f"{base}/-/ready")[0] == 200, timeout=20,
                 what="prometheus ready")
        assert procs[-1].poll() is None, (tmp_path / "prometheus.log").read_text()
        return base

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_prometheus_scrapes_healthgate_up(agent_process, dependency, prometheus) -> None:
    """A real Prometheus with the deployed scrape configs and rules reads healthgate_up = 1 from a running
    agent, through both the static job and the Kubernetes relabelling, and 0 once a dependency dies."""
    agent = agent_process(AGENT % dependency.port)
    wait_for(lambda: agent.get("/health")[0] == 200, what="agent up")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "healthgate.rules.yml")]
    static = config["scrape_configs"][0]
    static.update(scrape_interval="1s", scrape_timeout="1s")
    static["static_configs"] = [{"targets": [f"127.0.0.1:{agent.port}"]}]
    k8s = without_kubernetes_sd(yaml.safe_load((DEPLOY / "prometheus-kubernetes.yml").read_text()), [
        pod("127.0.0.1", agent.port),
        pod("127.0.0.2", agent.port, scrape="false", __meta_kubernetes_pod_name="not-scraped"),
    ])["scrape_configs"][0]
    k8s.update(job_name="healthgate-kubernetes", scrape_interval="1s", scrape_timeout="1s")
    config["scrape_configs"].append(k8s)
    base = prometheus(config)

    wait_for(lambda: values(base, "healthgate_up") == {"healthgate": "1", "healthgate-kubernetes": "1"},
             timeout=20, what="healthgate_up = 1 from both jobs")
    (series,) = query(base, 'healthgate_up{job="healthgate-kubernetes"}')
    assert series["metric"] == {"__name__": "healthgate_up", "job": "healthgate-kubernetes",
                                     "instance": f"127.0.0.1:{agent.port}", "node": "node-a",
                                     "namespace": "healthgate", "pod": "healthgate-x1"}
    targets = json.loads(http_get(f"{base}/api/v1/targets")[1])["data"]
    scraped = [t["scrapeUrl"] for t in targets["activeTargets"] if t["labels"]["job"] == "healthgate-kubernetes"]
    assert scraped == [f"http://127.0.0.1:{agent.port}/metrics"]
    rules = json.loads(http_get(f"{base}/api/v1/rules")[1])["data"]["groups"]
    assert [(g["name"], len(g["rules"])) for g in rules] == [("healthgate", 8)]

    dependency.close()
    wait_for(lambda: values(base, 'healthgate_up{job="healthgate"}') == {"healthgate": "0"}, timeout=20,
             what="healthgate_up = 0 after the dependency died")
    assert values(base, 'healthgate_check_up{check="dep"}')["healthgate"] == "0"
