"""Kubernetes and KServe manifests (schemas, offline), compose and Grafana consistency."""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from sdde_serve.server.settings import Settings
from tests.deploy.helpers import DEPLOY, RULES, base_metric, contract_metrics, series_names

K8S_VERSION = "1.33.0"  # oldest version we claim; every file must validate against its schema
K8S_DOCS = [
    (p, d)
    for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
    for d in yaml.safe_load_all(p.read_text())
]
KSERVE = list(yaml.safe_load_all((DEPLOY / "kserve" / "inferenceservice.yaml").read_text()))
# Kinds that are custom resources: no schema in kubernetes-validate, checked field by field below.
CRDS = {"ServiceMonitor", "InferenceService"}


def _by_kind(kind: str) -> dict:
    (doc,) = [d for _, d in K8S_DOCS if d["kind"] == kind]
    return doc


def _validate(doc: dict) -> None:
    # strict: unknown fields (typos like "readinesProbe") are errors, not silently ignored
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "doc", [d for _, d in K8S_DOCS if d["kind"] not in CRDS], ids=lambda d: d["kind"]
)
def test_kubernetes_schema(doc: dict):
    _validate(doc)


def test_schema_check_rejects_mistakes():
    """The validator really checks (offline, strict) rather than passing anything."""
    bad = json.loads(json.dumps(_by_kind("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)
    bad = json.loads(json.dumps(_by_kind("Deployment")))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(bad)


def test_deployment_probes_threads_drain_and_security():
    dep, svc, cm = _by_kind("Deployment"), _by_kind("Service"), _by_kind("ConfigMap")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert all(c[p]["httpGet"]["port"] == "http" for p in ("readinessProbe", "livenessProbe"))
    # threads = the CPU request, through the Settings field the server reads
    env = {e["name"]: e for e in c["env"]}
    ref = env["SDDE_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert (ref["resource"], ref["containerName"], ref["divisor"]) == (
        "requests.cpu",
        c["name"],
        "1",
    )
    assert "cpu" in c["resources"]["requests"] and "memory" in c["resources"]["requests"]
    # every ConfigMap key is a real server setting (pydantic-settings ignores unknown SDDE_* ones)
    settings = {f"SDDE_{name.upper()}" for name in Settings.model_fields}
    assert set(cm["data"]) <= settings, set(cm["data"]) - settings
    assert set(env) <= settings
    assert c["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    assert int(cm["data"]["SDDE_PORT"]) == port
    assert cm["data"]["SDDE_WORKERS"] == "1"
    # the model repository is the read-only volume, polled for new versions
    assert cm["data"]["SDDE_MODEL"] == "/models"
    assert float(cm["data"]["SDDE_POLL_REPO_S"]) > 0
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    # drain: preStop sleep + the server's drain fit in the grace period
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep + float(cm["data"]["SDDE_DRAIN_TIMEOUT_S"]) < pod["terminationGracePeriodSeconds"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # non-root, matching the image's uid
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Service and scrape annotations point at the same port
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}["http"] == "http"
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == port
    assert ann["prometheus.io/path"] == "/metrics"
    claim = next(v for v in pod["volumes"] if v["name"] == mounts["/models"]["name"])
    assert (
        claim["persistentVolumeClaim"]["claimName"]
        == _by_kind("PersistentVolumeClaim")["metadata"]["name"]
    )


def test_hpa_and_pdb_target_the_deployment():
    dep, hpa, pdb = (
        _by_kind("Deployment"),
        _by_kind("HorizontalPodAutoscaler"),
        _by_kind("PodDisruptionBudget"),
    )
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_servicemonitor_selects_the_service_port():
    sm, svc = _by_kind("ServiceMonitor"), _by_kind("Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    # SddeTargetDown selects up{job=~".*sdde.*"}; the operator names the job after the Service
    assert "sdde" in svc["metadata"]["name"]


def test_kserve_inferenceservices():
    custom, triton = KSERVE
    for isvc in KSERVE:
        assert (isvc["apiVersion"], isvc["kind"]) == (
            "serving.kserve.io/v1beta1",
            "InferenceService",
        )
        assert set(isvc["spec"]) == {"predictor"}
    # the custom predictor's container is a Kubernetes Container: validate it inside a Pod
    (c,) = custom["spec"]["predictor"]["containers"]
    _validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [c]}}
    )
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SDDE_MODEL"].startswith(
        "/mnt/models/"
    )  # where KServe's storage initializer puts it
    assert env["STORAGE_URI"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["readinessProbe"]["httpGet"]["port"] == c["ports"][0]["containerPort"]
    assert c["args"][c["args"].index("--port") + 1] == str(c["ports"][0]["containerPort"])
    model = triton["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] == "onnx" and model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"]
    _validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": {"containers": [{"name": "x", "resources": model["resources"]}]},
        }
    )


# --- compose, Prometheus config and Grafana ----------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _host_path(volume: str | dict) -> tuple[str, str]:
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target, *_ = volume.split(":")
    return source, target


def test_compose_is_consistent():
    services = _compose()["services"]
    assert set(services) == {"sdde", "prometheus", "grafana"}
    server = services["sdde"]
    assert server["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / server["build"]["dockerfile"]).is_file()
    port = int(server["environment"]["SDDE_PORT"])
    assert f"{port}:{port}" in server["ports"]
    assert set(server["environment"]) <= {f"SDDE_{n.upper()}" for n in Settings.model_fields}
    # threads match the CPUs the container gets
    assert int(server["environment"]["SDDE_INTRA_OP_THREADS"]) == int(server["cpus"])
    (model,) = server["volumes"]
    assert model["target"] == "/models/model.onnx" and model["read_only"] is True

    # every bind mount of Prometheus and Grafana exists in the repo
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = _host_path(volume)
            if source.startswith("./"):  # bind mounts relative to deploy/ (not named volumes)
                assert (DEPLOY / source).exists(), f"{name}: {source} missing"
                mounts[target] = DEPLOY / source

    # Prometheus scrapes the server service on its port and loads the rules that are mounted
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "sdde")
    assert job["static_configs"][0]["targets"] == [f"sdde:{port}"]
    assert re.fullmatch(".*sdde.*", job["job_name"])  # SddeTargetDown's selector
    (pattern,) = prom["rule_files"]
    rules_dir = mounts["/etc/prometheus/" + pattern.split("/")[0]]
    assert RULES in rules_dir.glob(pattern.split("/", 1)[1])

    # Grafana: the provisioned data source is the one the dashboard uses; dashboards are mounted
    ds = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    prov = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "dashboards" / "sdde.yml").read_text()
    )
    path = prov["providers"][0]["options"]["path"]
    assert (mounts[path] / "sdde.json").is_file()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/sdde.json"
    dash = json.loads((mounts[path] / "sdde.json").read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == source["uid"]


DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "sdde.json").read_text())
REQUIRED_PANELS = {
    "OOD rate": "sdde:ood_rate:ratio_rate5m",
    "Confidence distribution": "sdde_confidence_bucket",
    "Predicted-class mix": "sdde_predicted_class_total",
    "Request rate": "sdde_requests_total",
    "Errors": "sdde:request_errors:ratio_rate5m",
    "Latency p50 / p99": "sdde_request_duration_seconds_bucket",
    "Batch size": "sdde_batch_size_bucket",
    "Model versions": "sdde_model_version_info",
    "Answers by version": "sdde_version_predictions_total",
    "Shadow vs live: agreement": "sdde:shadow_label_agreement:ratio_rate5m",
    "Shadow vs live: OOD rate": "sdde:shadow_ood_rate:ratio_rate5m",
    "Shadow vs live: latency p99": "sdde_shadow_duration_seconds_bucket",
    "Live accuracy (delayed labels)": "sdde:live_accuracy:ratio_rate1h",
    "Live calibration: ECE and NLL": "sdde:live_ece:ratio_rate1h",
}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_dashboard_has_the_panels_and_reads_contract_metrics():
    panels = {p["title"]: p for p in DASHBOARD["panels"]}
    for title, series in REQUIRED_PANELS.items():
        assert any(series in t["expr"] for t in panels[title]["targets"]), title
    latency = " ".join(t["expr"] for t in panels["Latency p50 / p99"]["targets"])
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.99," in latency
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    recorded = {
        r["record"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    contract = contract_metrics()
    for expr in dashboard_exprs():
        for name in series_names(expr):
            assert name in recorded or base_metric(name) in contract, name
    # panels don't overlap on the grid
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, p["title"]
        assert g["x"] + g["w"] <= 24
        cells |= mine
