"""Deploy artefacts, validated offline with real tools, and held to the server they describe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.core.flags import parse_value
from service.core.settings import ENV_PREFIX, Settings
from service.wire.health import LIVENESS, OVERALL

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = ["cpu", "gpu", "tls"]
CUSTOM_GROUPS = {  # custom resources: the npm package with their schemas
    "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
    "cert-manager.io": "@kubernetes-models/cert-manager",
}
NODE_MODULES = Path(os.environ.get("CONVSERVE_NODE_MODULES", ROOT / ".ci" / "npm" / "node_modules"))
CRD = ROOT / "tests" / "schemas" / "serving.kserve.io_inferenceservices.yaml"


def needed(present: bool, what: str) -> None:
    """Skip without ``what`` on a developer's machine; in CI (CI=true, .ci/run) fail instead."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; .ci/run provides it")
    pytest.skip(f"{what} is missing (.ci/run provides it)")


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (dev extra / .ci/run)")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = by_kind(objects, "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in pod(objects)["containers"] if c["name"] == "convserve")


def env_of(main: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in main["env"]}


def validate_custom(objects: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(ROOT / "tests" / "validate_custom_resources.mjs"), str(NODE_MODULES)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    for needed in (
        "ARG BASE=",
        "USER 10001",
        "EXPOSE 8000 8001 8002",
        "STOPSIGNAL SIGTERM",
        'ENTRYPOINT ["convserve"]',
        'CMD ["serve"]',
    ):
        assert needed in text, needed
    assert "torch" not in text.split("FROM ${BASE}")[1]  # the runtime stage has no torch
    assert (ROOT / ".dockerignore").is_file()


def test_the_image_installs_exactly_the_projects_runtime_dependencies(tmp_path: Path) -> None:
    # The dependency layer reads them from pyproject.toml with a one-line program: run it here.
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    [program] = re.findall(r'python3 -c "([^"]+)" > /tmp/requirements.txt', text)
    program = program.replace("/tmp/pyproject.toml", str(ROOT / "pyproject.toml"))
    printed = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert printed == project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert "--no-deps /wheels/convserve-" in text  # and the wheel on top, without them


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_kubernetes_validate_strict(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    builtin = [o for o in objects if o["apiVersion"].split("/")[0] not in CUSTOM_GROUPS]
    assert {o["kind"] for o in builtin} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "NetworkPolicy",
        "ServiceAccount",
    }
    kubernetes_validate(builtin, tmp_path)


def kubernetes_validate(objects: list[dict[str, Any]], tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(objects)


def node_and_schemas() -> None:
    needed(shutil.which("node") is not None, "Node.js (node)")
    for package in CUSTOM_GROUPS.values():
        needed((NODE_MODULES / package).is_dir(), f"npm package {package} in {NODE_MODULES}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(overlay: str) -> None:
    node_and_schemas()
    custom = [o for o in render(overlay) if o["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    expected = ["PrometheusRule", "ServiceMonitor"] + (["Certificate"] if overlay == "tls" else [])
    assert sorted(o["kind"] for o in custom) == sorted(expected)
    result = validate_custom(custom)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid ") == len(custom)
    broken_specs = {
        "ServiceMonitor": {"nonsense": True},
        "PrometheusRule": {"groups": [{"rules": "not a list"}]},
        "Certificate": {"secretName": "convserve-tls"},  # no issuerRef
    }
    broken = [{**o, "spec": broken_specs[o["kind"]]} for o in custom]
    rejected = validate_custom(broken)
    assert rejected.returncode == 1  # the validator can fail, for each kind
    assert rejected.stderr.count("invalid ") == len(broken), rejected.stdout + rejected.stderr


def test_readme_examples_match_their_schemas(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "deploy" / "README.md").read_text(), re.S)
    documents = [
        d
        for b in blocks
        for d in yaml.safe_load_all(b)
        if isinstance(d, dict) and "apiVersion" in d
    ]
    custom = [d for d in documents if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert sorted(d["kind"] for d in custom) == ["Certificate"] * 2 + ["Issuer"] * 2
    builtin = [d for d in documents if d not in custom]
    assert [d["kind"] for d in builtin] == ["NetworkPolicy"]  # the egress lock
    kubernetes_validate(builtin, tmp_path)
    node_and_schemas()
    result = validate_custom(custom)
    assert result.returncode == 0, result.stdout + result.stderr


def test_inference_service_matches_the_kserve_crd() -> None:
    needed(CRD.is_file(), f"KServe's CRD at {CRD}")
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"][
        "openAPIV3Schema"
    ]
    service = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    jsonschema.validate(service, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**service, "spec": {"predictor": {"minReplicas": "two"}}}, schema)
    [predictor] = service["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in predictor["env"]}
    assert predictor["ports"][0]["containerPort"] == int(env["CONVSERVE_GRPC_PORT"])
    assert predictor["ports"][0]["name"] == "h2c"  # KServe routes gRPC to a port named h2c
    # REST on a second port: KServe's Standard mode only (Knative takes one port a container).
    assert predictor["ports"][1]["containerPort"] == int(env["CONVSERVE_HTTP_PORT"])
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    check_env(env)


def check_env(env: dict[str, str]) -> None:
    """Every CONVSERVE_* variable names a setting and parses as the server would parse it."""
    names = {spec.name: spec for spec in fields(Settings)}
    values = {}
    for key, text in env.items():
        assert key.startswith(ENV_PREFIX), key
        name = key[len(ENV_PREFIX) :].lower()
        assert name in names, f"{key} is not a server setting"
        values[name] = parse_value(names[name].type, text)
    Settings(**values)  # cross-field checks pass too


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_server(overlay: str) -> None:
    objects = render(overlay)
    main = container(objects)
    env = env_of(main)
    check_env(env)
    assert main["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    health = int(env.get("CONVSERVE_HEALTH_PORT", "-1"))
    assert ports == {
        "http": int(env["CONVSERVE_HTTP_PORT"]),
        "grpc": int(env["CONVSERVE_GRPC_PORT"]),
        "metrics": int(env["CONVSERVE_METRICS_PORT"]),
        **({"health": health} if health > 0 else {}),
    }
    # Under TLS the kubelet cannot pass the handshake: probes go to the plaintext health port.
    probed = ports["health"] if env.get("CONVSERVE_GRPC_USE_SSL") == "true" else ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == probed, probe
    for probe in ("startupProbe", "readinessProbe"):
        assert main[probe]["grpc"]["service"] == OVERALL, probe
    # Liveness is its own question: a draining pod is live, a wedged one is not.
    assert main["livenessProbe"]["grpc"]["service"] == LIVENESS
    spec = pod(objects)
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["CONVSERVE_DRAIN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain
    live = main["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > spec["terminationGracePeriodSeconds"]
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == env["CONVSERVE_MODEL_REPOSITORY"] for m in main["volumeMounts"])
    for service in by_kind(objects, "Service"):
        names = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
        assert names == {"http": "http", "grpc": "grpc", "metrics": "metrics"}
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    [monitor] = by_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    [hpa] = by_kind(objects, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"]
        == by_kind(objects, "Deployment")[0]["metadata"]["name"]
    )
    gpu = main["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == "1") == (overlay == "gpu")
    assert env["CONVSERVE_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_carry_no_service_account_token(overlay: str) -> None:
    objects = render(overlay)
    spec = pod(objects)
    assert spec["automountServiceAccountToken"] is False
    [account] = by_kind(objects, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_the_model_control_mode(overlay: str) -> None:
    # The base leaves it out, so each overlay states its own choice (tls takes cpu's).
    assert "CONVSERVE_MODEL_CONTROL_MODE" not in (K8S / "base" / "deployment.yaml").read_text()
    assert env_of(container(render(overlay)))["CONVSERVE_MODEL_CONTROL_MODE"] == "none"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_clients_and_monitoring_only(overlay: str) -> None:
    objects = render(overlay)
    [policy] = by_kind(objects, "NetworkPolicy")
    labels = by_kind(objects, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"], "a rule without ports admits every port"
        for port in rule["ports"]:
            assert port["protocol"] == "TCP" and port["port"] not in sources
            sources[port["port"]] = rule.get("from", [])
    ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert set(sources) == set(ports.values())
    assert sources[ports["grpc"]] == [
        {"podSelector": {}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"convserve.io/client": "true"}}},
    ]
    assert sources[ports["http"]] == sources[ports["grpc"]]  # REST: the same clients as gRPC
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert sources[ports["metrics"]] == [{"namespaceSelector": monitoring}]
    if "health" in ports:  # the kubelet probes from the node: no selector can name it
        assert sources[ports["health"]] == []


def test_tls_overlay_serves_the_certificate_that_cert_manager_issues() -> None:
    objects = render("tls")
    main, spec = container(objects), pod(objects)
    env = env_of(main)
    assert env["CONVSERVE_GRPC_USE_SSL"] == env["CONVSERVE_GRPC_USE_SSL_MUTUAL"] == "true"
    [certificate] = by_kind(objects, "Certificate")
    [volume] = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert volume["secret"]["defaultMode"] == 0o440
    [mount] = [m for m in main["volumeMounts"] if m["name"] == volume["name"]]
    # A subPath mount is never updated, so a renewed certificate would not reach the server.
    assert mount["readOnly"] and "subPath" not in mount
    folder = mount["mountPath"]
    assert env["CONVSERVE_GRPC_SERVER_CERT"] == f"{folder}/tls.crt"
    assert env["CONVSERVE_GRPC_SERVER_KEY"] == f"{folder}/tls.key"
    assert env["CONVSERVE_GRPC_ROOT_CERT"] == f"{folder}/ca.crt"
    assert certificate["spec"]["issuerRef"]["name"]
    assert "server auth" in certificate["spec"]["usages"]
    grpc_port, http_port = int(env["CONVSERVE_GRPC_PORT"]), int(env["CONVSERVE_HTTP_PORT"])
    for service in by_kind(objects, "Service"):
        assert service["metadata"]["name"] in certificate["spec"]["dnsNames"]
        protocols = {p["port"]: p.get("appProtocol") for p in service["spec"]["ports"]}
        assert protocols[grpc_port] == protocols[http_port] == "https"  # REST takes the TLS too
    for overlay in ("cpu", "gpu"):
        for service in by_kind(render(overlay), "Service"):
            protocols = {p["port"]: p.get("appProtocol") for p in service["spec"]["ports"]}
            assert protocols[grpc_port] == "kubernetes.io/h2c"
            assert protocols[http_port] == "http"


def test_generated_rule_and_dashboard_manifests_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    config_map = yaml.safe_load((K8S / "base" / "grafana-dashboard.yaml").read_text())
    assert json.loads(config_map["data"]["convserve.json"]) == json.loads(
        (ROOT / "deploy" / "grafana" / "convserve.json").read_text()
    )


def test_the_image_builds_its_wheel_from_every_package() -> None:
    """The wheel stage copies each package pyproject includes, or the image fails at import."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in include["packages"]["find"]["include"]]
    copied = re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert sorted(packages) == sorted(copied) == ["export", "model_format", "service"]
