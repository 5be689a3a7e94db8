"""config/kubernetes/: validated offline against the Kubernetes API schemas, and checked against
the image and the gateway they run.

- Every built-in object with ``kubernetes-validate --strict`` (PyPI; it ships the API server's
  OpenAPI schemas, so nothing is fetched), for the newest Kubernetes version it knows; the
  ServiceMonitor (a prometheus-operator CRD, not in those schemas) against the CRD's schema as
  compiled by ``@kubernetes-models/prometheus-operator`` (npm; tests/data/k8s-models).
- The pieces fit: selectors, the named port, probes on /healthz and /readyz, the token as a file
  where the gateway reads it, the image's uid, a read-only root with nothing writable mounted, termination grace longer than the shutdown timeout, memory requests from the measured
  figures, and a ConfigMap whose gateway.toml the gateway itself accepts.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from spectacles_gateway.durations import parse_duration

from .test_consumers import node_for
from .test_deploy import parse_dockerfile

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "kubernetes"
MODELS = Path(__file__).resolve().parent / "data" / "k8s-models"
BIN = Path(sys.executable).parent
#: MiB per worker process and per busy shard, and the supervisor (docs/deployment.md, "Sizing").
MIB_PER_WORKER, MIB_PER_SHARD, MIB_SUPERVISOR = 47, 0.3, 40


def objects() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def one(kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects() if o["kind"] == kind]
    return found


def validator() -> str:
    found = shutil.which("kubernetes-validate") or str(BIN / "kubernetes-validate")
    if not Path(found).exists():
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return found


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [validator(), "--strict", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_api_schemas(path: Path) -> None:
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    builtin = [
        o for o in yaml.safe_load_all(path.read_text()) if o and "coreos" not in o["apiVersion"]
    ]
    passed = re.findall(r"^INFO .* passed for resource", result.stdout, re.M)
    assert len(passed) == len(builtin), result.stdout + result.stderr
    version = importlib.metadata.version("kubernetes-validate")
    print(f"kubernetes-validate {version}: {path.name}: {len(passed)} passed")


@pytest.mark.parametrize(
    ("probe", "field", "value", "said"),
    [
        ("livenessProbe", "httpGet", {"path": "/healthz", "port": ["metrics"]}, "httpGet.port"),
        ("readinessProbe", "periodSecond", 10, "periodSecond"),  # unknown: --strict refuses it
    ],
)
def test_the_validator_rejects_a_broken_manifest(
    tmp_path: Path, probe: str, field: str, value: object, said: str
) -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0][probe][field] = value
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(deployment))
    result = validate(broken)
    assert result.returncode != 0
    assert said in result.stdout + result.stderr, result.stdout + result.stderr


def models_node() -> str:
    package = "@kubernetes-models/prometheus-operator"
    return node_for(MODELS, package, "the ServiceMonitor's CRD schema check")


def validate_monitors(monitors: list[dict[str, Any]]) -> dict[str, Any]:
    result = subprocess.run(
        [models_node(), "validate.mjs"],
        input=json.dumps(monitors),
        capture_output=True,
        text=True,
        cwd=MODELS,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_service_monitor_is_valid_against_the_prometheus_operator_crd() -> None:
    monitor = one("ServiceMonitor")
    assert validate_monitors([monitor]) == {"ok": True, "errors": []}
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["port"] = 8080
    del broken["spec"]["selector"]
    verdict = validate_monitors([broken])
    assert not verdict["ok"] and "selector" in verdict["errors"][0], verdict


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_selectors_ports_and_probes_fit_together() -> None:
    deployment, service, pdb = one("Deployment"), one("Service"), one("PodDisruptionBudget")
    monitor = one("ServiceMonitor")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = deployment["spec"]["selector"]["matchLabels"]
    for selector in (selected, service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), selector
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (container,) = pod(deployment)["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == 8080 and port["name"] == "metrics"
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    alert_job = 'job="spectacles-gateway"'
    assert alert_job in (ROOT / "config" / "alerts.yml").read_text()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "spectacles-gateway"
    probes = {
        k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {"metrics"}
    assert deployment["spec"]["replicas"] >= 2, "a fleet of members"
    assert pdb["spec"]["maxUnavailable"] == 1
    toml = one("ConfigMap")["data"]["gateway.toml"]
    assert re.search(r'^address = ":8080"$', toml, re.M), "the port the probes use"


def test_runs_as_the_image_user_read_only_with_its_token_as_a_file() -> None:
    stages = parse_dockerfile((ROOT / "docker" / "Dockerfile").read_text())
    final = stages[-1]
    uid, gid = (final.last("USER") or "").split(":")
    deployment = one("Deployment")
    spec = pod(deployment)
    (container,) = spec["containers"]
    security = spec["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    assert security["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The gateway writes no file: every mount is read-only (the config, the token).
    assert all(m.get("readOnly") for m in container["volumeMounts"]), container["volumeMounts"]
    assert not [n for n, v in volumes.items() if "emptyDir" in v]
    # The token: a Secret file at /run/secrets/discord_token, never an env variable.
    token_volume = next(n for n, v in volumes.items() if "secret" in v)
    items = volumes[token_volume]["secret"]["items"]
    paths = [f"{mounts[token_volume]}/{item['path']}" for item in items]
    assert paths == ["/run/secrets/discord_token"]
    assert not any("TOKEN" in e["name"] for e in container.get("env", []))
    assert "token" not in one("ConfigMap")["data"]["gateway.toml"]
    assert final.last("WORKDIR") == mounts["config"], "gateway.toml where the gateway looks"


def test_grace_period_and_resources_follow_the_gateway() -> None:
    deployment = one("Deployment")
    spec = pod(deployment)
    (container,) = spec["containers"]
    toml = one("ConfigMap")["data"]["gateway.toml"]
    shutdown = parse_duration(re.search(r'shutdown_timeout = "([^"]+)"', toml)[1])  # type: ignore[index]
    assert spec["terminationGracePeriodSeconds"] >= shutdown + 10
    workers = int(next(e["value"] for e in container["env"] if e["name"] == "SUPERVISOR_WORKERS"))
    requests = container["resources"]["requests"]
    limits = container["resources"]["limits"]
    mib = {"Mi": 1, "Gi": 1024}
    request = int(requests["memory"][:-2]) * mib[requests["memory"][-2:]]
    limit = int(limits["memory"][:-2]) * mib[limits["memory"][-2:]]
    floor = MIB_SUPERVISOR + workers * MIB_PER_WORKER
    assert request >= floor, f"{request} MiB < {floor} MiB for {workers} workers"
    assert limit >= floor + 200 * MIB_PER_SHARD
    assert "cpu" not in limits, "no CPU limit: throttling delays heartbeats"


def test_the_configmap_is_accepted_by_the_gateway(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(one("ConfigMap")["data"]["gateway.toml"])
    secret = next(o for o in objects() if o["kind"] == "Secret" and "AMQP_URL" in o["stringData"])
    env = {"PATH": os.environ.get("PATH", ""), "DISCORD_TOKEN": "x", **secret["stringData"]}
    result = subprocess.run(
        [str(BIN / "spectacles-supervise"), "--config", str(config), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    printed = result.stdout
    assert "amqp" in printed and "redis" in printed
    assert "CHANGE-ME" not in printed, "the URL's password is masked"


def test_the_replicas_form_a_fleet_named_by_their_pods() -> None:
    import tomllib

    toml = tomllib.loads(one("ConfigMap")["data"]["gateway.toml"])
    assert toml["fleet"]["name"] and toml["shard_store"]["type"] == "redis"
    assert toml["shards"]["count"] == 0 and "ids" not in toml["shards"]  # the fleet shares all
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    member = next(e for e in container["env"] if e["name"] == "FLEET_MEMBER")
    assert member["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert one("Deployment")["spec"]["replicas"] > 1
