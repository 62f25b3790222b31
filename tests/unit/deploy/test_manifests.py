"""Offline checks of the deployment artifacts: Dockerfile, docker-compose.yml, deploy/k8s/.

No Docker engine and no cluster here, so each artifact is checked the way CI can: against its
schema (compose spec, Kubernetes OpenAPI, the vendored KEDA CRD schema) and against the code it
deploys (settings names, topic and consumer-group names, ports, the non-root uid). Every schema
ships with a package or in deploy/schemas/: nothing is fetched.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from pydantic import SecretStr

from shared import topics
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = ROOT / "deploy" / "schemas" / "keda.sh_scaledobject_v1alpha1.json"
SERVICES = ("gateway", *topics.STAGE_SERVICE.values())
STAGE_SERVICES = tuple(topics.STAGE_SERVICE.values())
# oldest Kubernetes we claim to support, and the newest schema kubernetes-validate ships
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
OPTIONAL_K8S_FILES = {"gateway-ingress.yaml"}
ENV_PREFIX = "COHORTFLOW_"

Doc = dict[str, Any]


# --- shared readers -----------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def secret_env_names() -> set[str]:
    """Settings typed SecretStr, plus the database URL (it carries the password)."""
    names = {
        ENV_PREFIX + name.upper()
        for name, field in Settings.model_fields.items()
        if "SecretStr" in repr(field.annotation)
    }
    return names | {ENV_PREFIX + "DATABASE_URL"}


def load_docs(path: Path) -> list[Doc]:
    """The file's objects, a fresh copy each call (a test may change what it gets)."""
    return copy.deepcopy(_parsed_yaml(path.read_text()))


@functools.cache
def _parsed_yaml(text: str) -> list[Doc]:
    # parsed once per text: the checks read the same manifests about a thousand times
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomization() -> Doc:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_docs() -> list[tuple[str, Doc]]:
    """Every object of every manifest, the optional ones included."""
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [(p.name, doc) for p in files for doc in load_docs(p)]


def of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in k8s_docs() if doc["kind"] == kind]


def one(kind: str, name: str) -> Doc:
    found = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def configmap() -> dict[str, str]:
    return one("ConfigMap", "cohortflow-config")["data"]


def secret() -> dict[str, str]:
    return one("Secret", "cohortflow-secrets")["stringData"]


def deployment(service: str) -> Doc:
    return one("Deployment", f"cohortflow-{service}")


def container(doc: Doc) -> Doc:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def compose() -> Doc:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def runtime_stage() -> list[dict[str, Any]]:
    """The instructions of the last stage (the image that ships)."""
    structure = dockerfile().structure
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def instruction(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [ins["value"] for ins in stage if ins["instruction"] == name]


def expand_compose_defaults(value: str) -> str:
    """`${VAR:-default}` -> default, `${VAR:?msg}` -> a stand-in, as compose would with VAR unset."""
    value = re.sub(r"\$\{[A-Z][A-Z0-9_]*:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}", "set-by-operator", value)


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    parser = dockerfile()
    args: dict[str, str] = {}
    for ins in parser.structure:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            name, _, default = ins["value"].partition("=")
            args[name] = default
    froms = [ins["value"] for ins in parser.structure if ins["instruction"] == "FROM"]
    assert len(froms) >= 2, "build and runtime stages expected"
    for value in froms:
        image = value.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert image.startswith("python:3.11-slim"), value
    assert froms[-1].split()[-1] == "runtime"


def test_runtime_stage_runs_as_the_non_root_uid_kubernetes_expects() -> None:
    users = instruction(runtime_stage(), "USER")
    assert users, "runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid, so runAsNonRoot can verify it"
    assert gid.isdigit() and int(gid) != 0
    for service in SERVICES:
        pod_security = deployment(service)["spec"]["template"]["spec"]["securityContext"]
        assert pod_security["runAsUser"] == int(uid)
        assert pod_security["runAsGroup"] == int(gid)


def test_runtime_installs_the_project_from_wheels_built_in_the_build_stage() -> None:
    runs = " ".join(instruction(runtime_stage(), "RUN"))
    assert "from=build" in runs and "--no-index" in runs and "pip install" in runs
    # the binaries the exporter needs come from pip dependencies, not from apt
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", dep)[0].lower() for dep in deps}
    assert {"dcm2niix", "bids-validator-deno"} <= names


def test_entrypoint_is_the_cli_and_the_default_command_is_the_gateway() -> None:
    stage = runtime_stage()
    assert json.loads(instruction(stage, "ENTRYPOINT")[-1]) == ["cohortflow"]
    assert json.loads(instruction(stage, "CMD")[-1]) == ["gateway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cohortflow"] == "cohortflow.cli:main"


def test_image_settings_are_real_settings_and_match_the_exposed_ports() -> None:
    env = dockerfile().envs
    ours = {key for key in env if key.startswith(ENV_PREFIX)}
    assert ours <= settings_env_names(), ours - settings_env_names()
    exposed = set(" ".join(instruction(runtime_stage(), "EXPOSE")).split())
    assert {env["COHORTFLOW_GATEWAY_PORT"], env["COHORTFLOW_SERVICE_PORT"]} <= exposed
    # the root filesystem is read-only in Kubernetes: every cache must point under /tmp
    for key in ("TMPDIR", "XDG_CACHE_HOME", "DENO_DIR", "COHORTFLOW_HOME"):
        assert env[key].startswith("/tmp"), key


def test_dockerignore_keeps_what_the_build_copies_and_drops_local_state() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for value in instruction(dockerfile().structure, "COPY"):
        if "--from" in value:
            continue
        copied += [src for src in value.split()[:-1] if not src.startswith("--")]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/") not in ignored, f".dockerignore drops {source}"
    assert {".git", ".venv", ".env"} <= set(ignored)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _unused_port() -> int:
    probe = HTTPServer(("127.0.0.1", 0), _Health)
    port = probe.server_address[1]
    probe.server_close()
    return port


def _run_healthcheck(service_port: int, gateway_port: int) -> int:
    healthcheck = instruction(runtime_stage(), "HEALTHCHECK")[-1]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    env = {
        **os.environ,
        "COHORTFLOW_SERVICE_PORT": str(service_port),
        "COHORTFLOW_GATEWAY_PORT": str(gateway_port),
    }
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode


@pytest.mark.parametrize("role", ["stage service", "gateway"])
def test_image_healthcheck_passes_when_the_service_answers_healthz(
    health_server: HTTPServer, role: str
) -> None:
    port = health_server.server_address[1]
    closed = _unused_port()
    ports = (port, closed) if role == "stage service" else (closed, port)
    _Health.status = 200
    assert _run_healthcheck(*ports) == 0


def test_image_healthcheck_fails_when_healthz_fails_or_nothing_listens(
    health_server: HTTPServer,
) -> None:
    _Health.status = 503
    try:
        assert _run_healthcheck(health_server.server_address[1], _unused_port()) == 1
    finally:
        _Health.status = 200
    assert _run_healthcheck(_unused_port(), _unused_port()) == 1


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_the_five_services_from_the_one_image_after_infra_and_migration() -> None:
    services = compose()["services"]
    images = {services[name]["image"] for name in (*SERVICES, "migrate")}
    assert len(images) == 1
    assert services["migrate"]["command"] == ["migrate"]
    for name in SERVICES:
        service = services[name]
        assert service["command"] == [name]
        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        assert conditions == {
            "postgres": "service_healthy",
            "kafka": "service_healthy",
            "minio": "service_healthy",
            "create-buckets": "service_completed_successfully",
            "migrate": "service_completed_successfully",
        }
        assert service["read_only"] is True


def test_compose_healthchecks_probe_each_services_own_port() -> None:
    services = compose()["services"]
    for name in ("kafka", "postgres", "minio", *SERVICES):
        assert services[name]["healthcheck"]["test"], name
    for name in SERVICES:
        env = services[name]["environment"]
        port = env["COHORTFLOW_GATEWAY_PORT" if name == "gateway" else "COHORTFLOW_SERVICE_PORT"]
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in probe, name
    # published on loopback unless the operator binds it elsewhere
    assert services["gateway"]["ports"] == [
        "${COHORTFLOW_GATEWAY_BIND:-127.0.0.1}:${COHORTFLOW_GATEWAY_PUBLISH:-8000}:8000"
    ]


def test_compose_infrastructure_is_kraft_kafka_postgres_16_and_minio_with_buckets() -> None:
    spec = compose()
    services = spec["services"]
    assert not any("zookeeper" in name for name in services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    env = services["gateway"]["environment"]
    assert kafka["environment"]["KAFKA_NUM_PARTITIONS"] == env["COHORTFLOW_KAFKA_PARTITIONS"]
    assert env["COHORTFLOW_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    script = services["create-buckets"]["command"][0]
    for bucket in (env["COHORTFLOW_DATA_BUCKET"], env["COHORTFLOW_AUDIT_BUCKET"]):
        assert f"mb --ignore-existing cohortflow/{bucket}" in script
    used = {
        volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
    }
    assert set(spec["volumes"]) <= used, "a declared volume nobody mounts"
    assert {"kafka-data", "postgres-data", "minio-data"} <= set(spec["volumes"])


def test_compose_settings_are_real_settings_that_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose()["services"]["gateway"]["environment"]
    assert set(env) <= settings_env_names(), set(env) - settings_env_names()
    # the project secret keys every pseudonym: compose must refuse to start without one
    assert ":?" in env["COHORTFLOW_PROJECT_SECRET"]
    for key, value in env.items():
        monkeypatch.setenv(key, expand_compose_defaults(str(value)))
    settings = Settings()
    assert settings.kafka_session_timeout_ms >= 6000, "real Kafka needs >= 6000"
    assert settings.service_port == 8080 and settings.gateway_port == 8000
    assert settings.data_roots == [Path("/data/incoming")]
    assert settings.s3_sources == []  # unset: no s3:// source is accepted
    assert settings.api_max_body_bytes == 16 * 1024 * 1024


# --- Kubernetes: schemas ------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed <= present, listed - present
    assert present - listed == OPTIONAL_K8S_FILES
    images = {image["name"] for image in kustomization()["images"]}
    for _, doc in k8s_docs():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            assert c["image"].split(":")[0] in images


def test_every_namespaced_object_is_in_the_kustomization_namespace() -> None:
    namespace = kustomization()["namespace"]
    for _, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_validate_strictly(version: str) -> None:
    checked = 0
    for name, doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {error.message}")
        checked += 1
    assert checked >= 20


def test_kubernetes_validate_cli_accepts_the_core_manifest_files() -> None:
    files = [
        str(p)
        for p in sorted(K8S.glob("*.yaml"))
        if p.name not in {"kustomization.yaml", "scaledobjects.yaml"}
    ]
    cli = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(cli), "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_an_unknown_field() -> None:
    doc = json.loads(json.dumps(deployment("sorter")))
    container(doc)["livenessProbe"]["httpGett"] = container(doc)["livenessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_scaled_objects_validate_against_the_vendored_keda_schema(
    keda_validator: jsonschema.Draft202012Validator,
) -> None:
    scaled = of_kind("ScaledObject")
    assert len(scaled) == len(STAGE_SERVICES)
    for doc in scaled:
        errors = [e.message for e in keda_validator.iter_errors(doc)]
        assert not errors, (doc["metadata"]["name"], errors)
        spec = doc["spec"]
        # the CRD's CEL rule, which JSON Schema cannot say
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "triggers", 0, "metadata", "lagThreshold"), 20),  # must be a string
        (("spec", "triggers", 0, "metadata", "consumergroup"), "x"),  # misspelt key
        (("spec", "maxReplicaCount"), 0),
        (("spec", "scaleTargetRef", "nam"), "x"),
    ],
)
def test_keda_schema_rejects_broken_scaled_objects(
    keda_validator: jsonschema.Draft202012Validator, path: tuple[Any, ...], value: object
) -> None:
    doc = json.loads(json.dumps(of_kind("ScaledObject")[0]))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert not keda_validator.is_valid(doc)


# --- Kubernetes: what the manifests say about the code ------------------------------------------


@pytest.mark.parametrize("stage", topics.STAGE_ORDER)
def test_each_stage_scales_on_the_lag_of_its_items_topic(stage: topics.Stage) -> None:
    service = topics.STAGE_SERVICE[stage]
    scaled = [
        doc
        for doc in of_kind("ScaledObject")
        if doc["spec"]["scaleTargetRef"]["name"] == f"cohortflow-{service}"
    ]
    assert len(scaled) == 1, service
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert (
        spec["scaleTargetRef"]["envSourceContainerName"] == container(deployment(service))["name"]
    )
    kafka = [t for t in spec["triggers"] if t["type"] == "kafka"]
    assert len(kafka) == 1
    metadata = kafka[0]["metadata"]
    assert metadata["topic"] == topics.items(stage)
    assert metadata["consumerGroup"] == topics.consumer_group(service, "items")
    assert metadata["bootstrapServersFromEnv"] in configmap()
    # consumers beyond the partition count sit idle
    assert spec["maxReplicaCount"] <= int(configmap()["COHORTFLOW_KAFKA_PARTITIONS"])
    assert spec["minReplicaCount"] >= 1, "at zero, nobody consumes the requested topic"
    assert "replicas" not in deployment(service)["spec"], "KEDA owns the replica count"


def test_the_five_deployments_run_their_service_from_the_one_image() -> None:
    deployments = {doc["metadata"]["name"] for doc in of_kind("Deployment")}
    assert deployments == {f"cohortflow-{service}" for service in SERVICES}
    images = {container(deployment(service))["image"] for service in SERVICES}
    assert len(images) == 1
    for service in SERVICES:
        assert container(deployment(service))["args"] == [service]
    job = one("Job", "cohortflow-migrate")
    assert container(job)["args"] == ["migrate"]
    assert container(job)["image"] in images


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_probes_ports_and_scrape_annotations_agree(service: str) -> None:
    doc = deployment(service)
    c = container(doc)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    setting = "COHORTFLOW_GATEWAY_PORT" if service == "gateway" else "COHORTFLOW_SERVICE_PORT"
    expected_port = int(configmap()[setting])
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path, (service, probe)
        assert ports[get["port"]] == expected_port, (service, probe)
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == expected_port


@pytest.mark.parametrize("service", SERVICES)
def test_deployment_is_locked_down_and_reads_config_and_secret(service: str) -> None:
    pod = deployment(service)["spec"]["template"]["spec"]
    c = container(deployment(service))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), (service, kind)
    sources = {(kind, ref["name"]) for source in c["envFrom"] for kind, ref in source.items()}
    assert sources == {("configMapRef", "cohortflow-config"), ("secretRef", "cohortflow-secrets")}


def test_every_pod_meets_the_restricted_pod_security_profile() -> None:
    namespace = one("Namespace", kustomization()["namespace"])
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    templates = [doc["spec"]["template"]["spec"] for doc in of_kind("Deployment") + of_kind("Job")]
    assert len(templates) == len(SERVICES) + 1
    for pod in templates:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("service", SERVICES)
def test_services_and_disruption_budgets_select_the_pods(service: str) -> None:
    pod_labels = deployment(service)["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container(deployment(service))["ports"]}
    selecting = [
        doc for doc in of_kind("Service") if doc["spec"]["selector"].items() <= pod_labels.items()
    ]
    assert len(selecting) == 1, service
    assert {p["targetPort"] for p in selecting[0]["spec"]["ports"]} <= port_names
    budgets = [
        doc
        for doc in of_kind("PodDisruptionBudget")
        if doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert len(budgets) == 1, service


def test_the_ingress_routes_to_the_gateway_service() -> None:
    ingress = one("Ingress", "cohortflow-gateway")
    service = one("Service", "cohortflow-gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_the_ingress_lets_the_gateway_refuse_oversized_bodies_itself() -> None:
    annotations = one("Ingress", "cohortflow-gateway")["metadata"]["annotations"]
    proxy = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert proxy.endswith("m")
    assert int(proxy[:-1]) * 1024 * 1024 > int(configmap()["COHORTFLOW_API_MAX_BODY_BYTES"])


def test_configmap_holds_settings_and_no_secret() -> None:
    data = configmap()
    assert set(data) <= settings_env_names(), set(data) - settings_env_names()
    assert not set(data) & secret_env_names()
    assert not [key for key in data if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key)]
    secret_values = set(secret().values())
    assert not [value for value in data.values() if value in secret_values]
    assert not [value for value in data.values() if "@" in value], "credentials in a URL"


def test_secret_holds_every_secret_setting_as_a_placeholder() -> None:
    data = secret()
    assert set(data) <= settings_env_names()
    assert secret_env_names() <= set(data)
    for key, value in data.items():
        assert "REPLACE_ME" in value, f"{key}: only placeholders belong in the repository"


def test_configmap_and_secret_parse_into_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**configmap(), **secret()}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.kafka_session_timeout_ms >= 6000, "real Kafka needs >= 6000"
    assert settings.gateway_host == settings.service_host == "0.0.0.0"
    assert settings.log_json is True
    assert isinstance(settings.project_secret, SecretStr)
