"""Deploy artefacts, validated offline with real tools, and held to the server they describe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.core.settings import ENV_PREFIX, Settings, parse_value
from service.wire.health import OVERALL

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
OVERLAYS = ["cpu", "gpu"]
CUSTOM_GROUPS = ("monitoring.coreos.com",)
NODE_MODULES = Path(os.environ.get("CONVSERVE_NODE_MODULES", ROOT / ".ci" / "npm" / "node_modules"))
CRD = ROOT.parent / "shared" / "crds" / "serving.kserve.io_inferenceservices.yaml"


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


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = by_kind(objects, "Deployment")
    return next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "convserve"
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
        "EXPOSE 8001 8002",
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
    }
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(builtin)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_operator_resources_match_their_schemas(overlay: str) -> None:
    needed(shutil.which("node") is not None, "Node.js (node)")
    needed(
        (NODE_MODULES / "@kubernetes-models" / "prometheus-operator").is_dir(),
        f"npm package @kubernetes-models/prometheus-operator in {NODE_MODULES}",
    )
    custom = [o for o in render(overlay) if o["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert sorted(o["kind"] for o in custom) == ["PrometheusRule", "ServiceMonitor"]
    result = subprocess.run(
        ["node", str(ROOT / "tests" / "validate_prometheus_operator.mjs"), str(NODE_MODULES)],
        input=json.dumps(custom),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    broken = json.loads(json.dumps(custom))
    broken[0]["spec"] = (
        {"nonsense": True}
        if broken[0]["kind"] == "ServiceMonitor"
        else {"groups": [{"rules": "not a list"}]}
    )
    rejected = subprocess.run(
        ["node", str(ROOT / "tests" / "validate_prometheus_operator.mjs"), str(NODE_MODULES)],
        input=json.dumps(broken),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rejected.returncode == 1  # the validator can fail


def test_inference_service_matches_the_kserve_crd() -> None:
    needed(CRD.is_file(), f"KServe's CRD at {CRD} (the team's shared/ folder beside the clone)")
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
    env = {e["name"]: e["value"] for e in main["env"]}
    check_env(env)
    assert main["args"] == ["serve"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {
        "grpc": int(env["CONVSERVE_GRPC_PORT"]),
        "metrics": int(env["CONVSERVE_METRICS_PORT"]),
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"]["port"] == ports["grpc"], probe
        assert main[probe]["grpc"]["service"] == OVERALL, probe
    spec = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
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
        assert names == {"grpc": "grpc", "metrics": "metrics"}
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
