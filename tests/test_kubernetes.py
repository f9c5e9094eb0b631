"""deploy/kubernetes: every manifest against the Kubernetes OpenAPI schemas, cross-checked with the agent."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent.config import Config, parse_config
from agent.serving.http_api import make_app
from agent.state import AgentState
from tests.helpers import PASSING, ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
APP_STOP_BUDGET = 10  # seconds the sidecar example gives its application after SIGTERM (see its comment)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def workloads() -> list[tuple[str, dict, Config]]:
    """(file, workload, the agent config from the ConfigMap it mounts) for every Deployment/DaemonSet."""
    out = []
    for path in MANIFESTS:
        objs = docs(path)
        maps = {d["metadata"]["name"]: d for d in objs if d["kind"] == "ConfigMap"}
        for w in objs:
            if w["kind"] not in ("Deployment", "DaemonSet"):
                continue
            pod = w["spec"]["template"]["spec"]
            (volume,) = [v for v in pod["volumes"] if "configMap" in v]
            toml = maps[volume["configMap"]["name"]]["data"]["healthgate.toml"]
            out.append((path.name, w, parse_config(tomllib.loads(toml), f"{path.name} ConfigMap")))
    return out


def healthgate_container(workload: dict) -> dict:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "healthgate"]
    return c


def test_there_are_a_sidecar_and_a_daemonset() -> None:
    """deploy/kubernetes holds the sidecar example and the node-level DaemonSet, each with its ConfigMap."""
    kinds = {(p.name, d["kind"]) for p in MANIFESTS for d in docs(p)}
    assert {("sidecar.yaml", "Deployment"), ("sidecar.yaml", "ConfigMap"), ("daemonset.yaml", "DaemonSet"),
            ("daemonset.yaml", "ConfigMap")} <= kinds
    assert len(workloads()) == 2


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_openapi(path: Path, version: str) -> None:
    """Every object validates against the Kubernetes OpenAPI schema in strict mode (unknown fields refused)."""
    for obj in docs(path):
        kubernetes_validate.validate(obj, version, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    """The validator really checks: a misspelt probe field is refused."""
    (deployment,) = [d for d in docs(DEPLOY / "sidecar.yaml") if d["kind"] == "Deployment"]
    broken = copy.deepcopy(deployment)
    container = healthgate_container(broken)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def routes() -> set[str]:
    app = make_app(AgentState(parse_config({"checks": [PASSING]}), 0.0), None)
    return {r.canonical for r in app.router.resources()}


def port_number(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return p


@pytest.mark.parametrize(("name", "workload", "config"), workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_probes_match_the_agents_config(name: str, workload: dict, config: Config) -> None:
    """Every probe and the container port hit the address the ConfigMap's agent listens on, on a real
    route: readiness on /ready for the sidecar (/live for the DaemonSet), liveness and startup on /live."""
    c = healthgate_container(workload)
    _, listen_port = config.server.listen
    known = routes()
    paths = {}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert port_number(c, get["port"]) == listen_port, probe
        assert get["path"] in known, probe
        paths[probe] = get["path"]
    ready = "/ready" if workload["kind"] == "Deployment" else "/live"
    assert paths == {"readinessProbe": ready, "livenessProbe": "/live", "startupProbe": "/live"}
    assert c["args"] == ["-c", "/etc/healthgate/healthgate.toml"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/healthgate"]
    assert mount["readOnly"] is True


def test_the_application_container_is_ready_on_its_own_group() -> None:
    """In the sidecar example the application container's readinessProbe asks the agent beside it for the
    verdict of its own group (/ready/<group>, a group of the ConfigMap), on the agent's port."""
    (_, workload, config), = [w for w in workloads() if w[1]["kind"] == "Deployment"]
    (app,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] != "healthgate"]
    get = app["readinessProbe"]["httpGet"]
    assert get["port"] == config.server.listen[1]
    prefix, _, group = get["path"].rpartition("/")
    assert prefix == "/ready" and group in config.groups, get["path"]
    assert "/ready/{check}" in routes()
    assert "livenessProbe" not in app, "a dependency's outage must never restart the application"


@pytest.mark.parametrize(("name", "workload", "config"), workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_shutdown_timing_fits_shutdown_drain(name: str, workload: dict, config: Config) -> None:
    """terminationGracePeriodSeconds covers the agent's drain; in the sidecar example the application's
    preStop outlasts the drain plus one readiness period, and the grace period covers preStop plus the
    application's own stop budget."""
    pod = workload["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    drain = config.server.shutdown_drain
    assert grace >= drain + 1 + 2, "drain, up to 1s to close the server, and a margin"
    if workload["kind"] == "Deployment":
        (app,) = [c for c in pod["containers"] if c["name"] != "healthgate"]
        pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop >= drain + healthgate_container(workload)["readinessProbe"]["periodSeconds"]
        assert grace >= pre_stop + APP_STOP_BUDGET
        assert "lifecycle" not in healthgate_container(workload), "healthgate must start draining at once"


def test_daemonset_scrape_annotations_match_agent_and_prometheus() -> None:
    """The DaemonSet's prometheus.io annotations name the agent's port and /metrics, and its label is the
    one the Kubernetes scrape config keeps."""
    (_, ds, config), = [w for w in workloads() if w[1]["kind"] == "DaemonSet"]
    template = ds["spec"]["template"]
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == config.server.listen[1]
    assert notes["prometheus.io/path"] in routes() and notes["prometheus.io/path"] == "/metrics"
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (keep,) = [r for r in prom["scrape_configs"][0]["relabel_configs"]
               if r["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]]
    assert re.fullmatch(keep["regex"], template["metadata"]["labels"]["app.kubernetes.io/name"])


@pytest.mark.parametrize(("name", "workload", "config"), workloads(), ids=lambda v: v if isinstance(v, str) else "")
def test_runs_non_root_on_a_read_only_root(name: str, workload: dict, config: Config) -> None:
    """healthgate runs as the image's non-root user with a read-only root filesystem; its only writable
    path is the state emptyDir, mounted where the image's STATE_DIRECTORY points."""
    from tests.test_docker import final_stage

    stage = final_stage()
    pod = workload["spec"]["template"]["spec"]
    c = healthgate_container(workload)
    sc = {**pod.get("securityContext", {}), **c["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert f"{sc['runAsUser']}:{sc['runAsGroup']}" == stage.user
    state_dir = stage.env["STATE_DIRECTORY"]
    # The ConfigMap leaves state_dir to $STATE_DIRECTORY, which the image points at the mount.
    assert "state_dir" not in config.agent.model_fields_set
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == state_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume and state_dir in stage.volumes
    assert c["image"] == stage.tag
