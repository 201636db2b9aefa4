"""The Helm chart (k8s/chart): it lints, and everything it renders is valid and consistent.

Renders with real Helm (helm-python-sdk: Helm v4 as a library, offline) for several value
sets, then checks every object three ways: custom resources against the published CRD schemas
in ../shared/crds (jsonschema on the served version's openAPIV3Schema, unknown fields refused,
and the schemas' CEL rules evaluated), core kinds with kubernetes-validate, and the references
between objects (selectors match pod labels, ports line up, the endpoint picker's Service is the
one the InferencePool names, the Serve args parse as AppConfig).

The Istio DestinationRule (epp.tls.istioDestinationRule) validates against Istio's CRD where
one is found: in ../shared/crds or a directory named in $DISAGG_TEST_CRDS (os.pathsep between
several), e.g. the DestinationRule document of istio/api's
kubernetes/customresourcedefinitions.gen.yaml. Without it those checks skip, saying so.
"""

from __future__ import annotations

import ast
import base64
import importlib.util
import copy
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from disagg.config import AppConfig

ROOT = Path(__file__).parents[2]
CHART = ROOT / "k8s" / "chart"
CRDS = ROOT.parent / "shared" / "crds"
EXTRA_CRDS = tuple(Path(p) for p in os.environ.get("DISAGG_TEST_CRDS", "").split(os.pathsep) if p)
# The CRDs are large (the RayService's is 1 MB): parse them with libyaml where it is there.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RELEASE = "demo"
NAMESPACE = "serving"
# The chart's kubeVersion floor and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.29", "1.37")
ROLES = ("prefill", "decode")

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    # No gateway side, so no DestinationRule for it either, asked or not.
    "gateway-off": {"gateway": {"enabled": False}, "epp": {"tls": {"istioDestinationRule": True}}},
    "multi-replica-gpu": {
        "fullnameOverride": "llama-70b",
        "image": {"repository": "registry.example.com/ml/disagg", "tag": "0.1.0-cu12"},
        "imagePullSecrets": [{"name": "registry"}],
        "model": {
            "path": "/models/Llama-3.3-70B-Instruct",
            "servedName": "llama-3.3-70b",
            "maxModelLen": 32768,
            "storage": {"mountPath": "/models", "volume": {"persistentVolumeClaim": {"claimName": "models"}}},
        },
        "engine": {"blockSize": 128, "maxNumBatchedTokens": 16384},
        "routing": {"pdThresholdTokens": 512},
        "config": {"kv_lease_s": 60, "routing": {"stale_after_s": 1.0, "pd_threshold_tokens": 1}},
        "prefill": {"replicas": 3, "gpus": 2, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "nodeSelector": {"gpu": "h100"}},
        "decode": {"replicas": 2, "gpus": 4, "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
        "gateway": {"create": False, "name": "shared-gateway", "failureMode": "FailOpen"},
        "epp": {"replicas": 2, "extraArgs": ["--log-level=DEBUG", "--discovery-interval=0.5"],
                "tls": {"istioDestinationRule": True}},
    },
    "cpu-only": {
        "prefill": {"replicas": 2, "gpus": 0, "resources": {"requests": {"cpu": "4", "memory": "8Gi"}}},
        "decode": {"replicas": 2, "gpus": 0, "resources": {"limits": {"cpu": "4", "memory": "8Gi"}}},
        "engine": {"blockSize": 32, "enforceEager": True, "kvBackend": "tcp"},
        "model": {"dtype": "float32"},
        "config": {"kv_cache_gib": 4},
        "ray": {"authMode": "disabled"},
        "gateway": {"className": "kgateway", "requestTimeout": None},
        "monitoring": {
            "grafanaHost": "http://grafana.monitoring.svc:80",
            "grafanaIframeHost": "http://127.0.0.1:3000",
            "prometheusHost": "http://prometheus.monitoring.svc:9090",
            "grafanaDashboard": {"enabled": True},
        },
    },
    # The EPP serves a certificate from a Secret (cert-manager's), and Istio verifies it.
    "epp-tls-secret": {
        "fullnameOverride": "llm",
        "epp": {"tls": {"certSecretName": "llm-epp-tls", "istioDestinationRule": True}},
    },
    "epp-plaintext": {"epp": {"tls": {"secureServing": False}}},
    # The token from a Secret of one's own; the workers' ports open to whoever the network allows;
    # a managed gateway whose proxies are addresses, not pods.
    "own-token-no-policy": {"internalToken": {"secretName": "llm-internal"}, "networkPolicy": {"enabled": False}},
    "managed-gateway": {
        "gateway": {"className": "gke-l7-rilb"},
        "networkPolicy": {"gatewayFrom": [{"ipBlock": {"cidr": "10.129.0.0/23"}}],
                          "extraIngress": [{"from": [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"port": 8200}]}]},
    },
}
GATEWAY_SETS = [name for name, v in VALUE_SETS.items() if v.get("gateway", {}).get("enabled", True)]
ISTIO_TLS_SETS = [name for name in GATEWAY_SETS
                  if VALUE_SETS[name].get("epp", {}).get("tls", {}).get("istioDestinationRule")]

CORE_API_VERSIONS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "networking.k8s.io/v1"}
CUSTOM_KINDS = {
    ("ray.io/v1", "RayService"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("networking.istio.io/v1", "DestinationRule"),
}
# Kinds the chart renders only on request, whose CRDs ../shared/crds may lack: checked where found.
OPTIONAL_CRDS = {
    ("networking.istio.io/v1", "DestinationRule"):
        "networking.istio.io_destinationrules.yaml (istio/api, kubernetes/customresourcedefinitions.gen.yaml)",
}


# --- rendering -------------------------------------------------------------------------------


def chart_values(name: str) -> dict[str, Any]:
    """The chart's defaults with a value set's overrides, as an install would compose them."""
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(copy.deepcopy(VALUE_SETS[name]))


@dataclass(frozen=True)
class Manifests:
    """One value set's rendered objects, with lookups by kind and name."""

    objects: tuple[dict[str, Any], ...]
    values: dict[str, Any]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert found, f"no {kind} named {name!r}; have {[o['metadata']['name'] for o in self.of_kind(kind)]}"
        return found[0]

    @property
    def cluster(self) -> dict[str, Any]:
        return self.one("RayService")["spec"]["rayClusterConfig"]

    def worker_group(self, role: str) -> dict[str, Any]:
        groups = [g for g in self.cluster["workerGroupSpecs"] if g["groupName"] == role]
        assert len(groups) == 1, f"expected one worker group {role!r}"
        return groups[0]

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.one("RayService")["spec"]["serveConfigV2"])

    @property
    def serve_app(self) -> dict[str, Any]:
        apps = self.serve_config["applications"]
        assert len(apps) == 1
        return apps[0]

    @property
    def app_config(self) -> AppConfig:
        return AppConfig.model_validate(self.serve_app["args"])

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(who, pod template) for every pod this release creates, directly or through KubeRay."""
        yield "head", self.cluster["headGroupSpec"]["template"]
        for group in self.cluster["workerGroupSpecs"]:
            yield group["groupName"], group["template"]
        for deployment in self.of_kind("Deployment"):
            yield deployment["metadata"]["name"], deployment["spec"]["template"]


@cache
def render(name: str) -> Manifests:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(copy.deepcopy(VALUE_SETS[name]), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                doc.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
                objects.append(doc)
    assert objects, f"{name}: the chart rendered nothing"
    return Manifests(tuple(objects), chart_values(name))


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return render(request.param)


@pytest.fixture(scope="module", params=GATEWAY_SETS)
def gateway_manifests(request: pytest.FixtureRequest) -> Manifests:
    return render(request.param)


# --- schemas ---------------------------------------------------------------------------------


def _forbid_unknown_fields(schema: Any) -> Any:
    """The API server prunes unknown fields silently; here they are errors (a typo'd key would
    otherwise be dropped without a word)."""
    if isinstance(schema, dict):
        schema = {k: _forbid_unknown_fields(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_forbid_unknown_fields(s) for s in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every served version in ../shared/crds (and
    $DISAGG_TEST_CRDS; a file may hold several CRDs)."""
    assert CRDS.is_dir(), f"CRD schemas not found at {CRDS}"
    out = {}
    for directory in (CRDS, *EXTRA_CRDS):
        for path in sorted(directory.glob("*.yaml")):
            for crd in yaml.load_all(path.read_text(), Loader=_YAML_LOADER):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    if version.get("served", True):
                        out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def has_crd_schema(obj: dict[str, Any]) -> bool:
    """Whether obj's CRD schema is here; fails for a kind whose schema must be (not OPTIONAL_CRDS)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas():
        return True
    assert key in OPTIONAL_CRDS, f"no CRD schema for {obj['apiVersion']} {obj['kind']}"
    return False


def skip_without_crds(objects: list[dict[str, Any]]) -> None:
    missing = sorted({OPTIONAL_CRDS[(o["apiVersion"], o["kind"])] for o in objects if not has_crd_schema(o)})
    if missing:
        pytest.skip(f"CRD schema not found in {CRDS} or $DISAGG_TEST_CRDS: {', '.join(missing)}")


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = copy.deepcopy(crd_schemas()[(api_version, kind)])
    # The API server takes apiVersion, kind and metadata at the root whether a CRD's schema names
    # them or not (Istio's do not).
    implicit = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
    schema["properties"] = {**implicit, **schema.get("properties", {})}
    return jsonschema.Draft7Validator(_forbid_unknown_fields(schema))


def crd_errors(obj: dict[str, Any]) -> list[str]:
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# Kubernetes escapes these property names inside CEL expressions.
_CEL_RESERVED = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
    "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
}


def _cel_escape(name: str) -> str:
    if name in _CEL_RESERVED:
        return f"__{name}__"
    return (name.replace("__", "__underscores__").replace(".", "__dot__")
            .replace("-", "__dash__").replace("/", "__slash__"))


def _cel_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {_cel_escape(k): _cel_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cel_value(v) for v in value]
    return value


def cel_rules(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every x-kubernetes-validations rule the object reaches: (path, rule, the value as self)."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                yield from cel_rules(props[key], item, f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from cel_rules(extra, item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from cel_rules(schema["items"], item, f"{path}[{i}]")


@cache
def cel_program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_failures(obj: dict[str, Any]) -> list[str]:
    celpy = pytest.importorskip(
        "celpy", reason="cel-python is not installed: the CRDs' CEL rules (x-kubernetes-validations) are not checked"
    )
    failures = []
    for path, rule, value in cel_rules(crd_schemas()[(obj["apiVersion"], obj["kind"])], obj):
        result = cel_program(rule).evaluate({"self": celpy.json_to_cel(_cel_value(value))})
        if isinstance(result, Exception) or not bool(result):
            failures.append(f"{obj['kind']}{path}: {rule} -> {result!r}")
    return failures


# --- metadata rules (the API server's, which no schema carries) --------------------------------

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label (Services)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def label_errors(labels: dict[str, Any], where: str) -> list[str]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
            errors.append(f"{where}: label key prefix {prefix!r}")
        if len(name) > 63 or not _LABEL_NAME.match(name):
            errors.append(f"{where}: label key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.match(value)):
            errors.append(f"{where}: label {key}={value!r}")
    return errors


def all_label_maps(value: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("labels", "matchLabels") and isinstance(item, dict):
                yield f"{where}.{key}", item
            else:
                yield from all_label_maps(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from all_label_maps(item, f"{where}[{i}]")


def nulls(value: Any, where: str = "") -> Iterator[str]:
    """Paths holding null or Go's "<no value>": a value the templates expected and did not get."""
    if value is None or value == "<no value>":
        yield where
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from nulls(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nulls(item, f"{where}[{i}]")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def parse_selector(text: str) -> dict[str, str]:
    """An equality-based label selector, `k=v,k2=v2`."""
    out = {}
    for term in text.split(","):
        key, sep, value = term.partition("=")
        assert sep and key and "!" not in key, f"not an equality selector term: {term!r}"
        out[key.strip()] = value.strip()
    return out


def container_port(template: dict[str, Any], name: str) -> int:
    ports = [p for c in template["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"expected one container port named {name!r}"
    return ports[0]["containerPort"]


# --- Helm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_clean_in_strict_mode(name: str) -> None:
    report = helm.lint(CHART, copy.deepcopy(VALUE_SETS[name]), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


def test_values_schema_refuses_unknown_and_malformed_values() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values({}))
        for bad in ({"gatway": {"enabled": False}}, {"prefill": {"gpus": "two"}},
                    {"networkPolicy": {"enabled": "yes"}}, {"networkPolicy": {"gatewayFrom": [{}]}},
                    {"networkPolicy": {"from": []}}, {"internalToken": {"secretName": "Internal_Token"}},
                    {"internalToken": {"token": "hunter2"}},
                    {"engine": {"blockSize": 24}}, {"gateway": {"failureMode": "Open"}},
                    # TLS: wrong types, an unknown key, a name no Secret can have, contradictions.
                    {"epp": {"tls": {"secureServing": "false"}}}, {"epp": {"tls": {"certSecretName": True}}},
                    {"epp": {"tls": {"istioDestinationRule": "yes"}}}, {"epp": {"tls": {"certSecret": "x"}}},
                    {"epp": {"tls": {"certSecretName": "EPP_TLS"}}},
                    {"epp": {"tls": {"secureServing": False, "certSecretName": "epp-tls"}}},
                    {"epp": {"tls": {"secureServing": False, "istioDestinationRule": True}}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(chart.merge_values(bad))
        for good in ({"epp": {"tls": {"secureServing": False}}},
                     {"epp": {"tls": {"certSecretName": "epp-tls.v2", "istioDestinationRule": True}}}):
            chart.validate_schema(chart.merge_values(good))


# --- every object, validated --------------------------------------------------------------------


def test_renders_the_expected_objects(manifests: Manifests) -> None:
    v = manifests.values
    expected = {("ray.io/v1", "RayService"), ("v1", "ConfigMap")}
    if v["gateway"]["enabled"]:
        expected |= {
            ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ServiceAccount"),
            ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
            ("inference.networking.k8s.io/v1", "InferencePool"), ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        }
        if v["gateway"]["create"]:
            expected.add(("gateway.networking.k8s.io/v1", "Gateway"))
        if istio_tls(v):
            expected.add(("networking.istio.io/v1", "DestinationRule"))
        if v["epp"]["replicas"] > 1:
            expected.add(("policy/v1", "PodDisruptionBudget"))
    if v["networkPolicy"]["enabled"]:
        expected.add(("networking.k8s.io/v1", "NetworkPolicy"))
    if not v["internalToken"]["secretName"]:
        expected.add(("v1", "Secret"))
    assert {(o["apiVersion"], o["kind"]) for o in manifests.objects} == expected
    configmaps = 2 if v["monitoring"]["grafanaDashboard"]["enabled"] else 1
    assert len(manifests.of_kind("ConfigMap")) == configmaps
    keys = [(o["kind"], o["metadata"]["name"]) for o in manifests.objects]
    assert len(keys) == len(set(keys)), "two objects of one kind share a name"


def test_custom_resources_match_their_crd_schemas(manifests: Manifests) -> None:
    custom = [o for o in manifests.objects if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS]
    assert custom
    for obj in custom:
        if has_crd_schema(obj):
            assert crd_errors(obj) == [], obj["kind"]
    skip_without_crds(custom)


def test_custom_resources_satisfy_their_crd_cel_rules(manifests: Manifests) -> None:
    custom = [o for o in manifests.objects if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS]
    for obj in custom:
        if has_crd_schema(obj):
            assert cel_failures(obj) == []
    skip_without_crds(custom)


def test_core_objects_pass_kubernetes_validate(manifests: Manifests) -> None:
    core = [o for o in manifests.objects if o["apiVersion"] in CORE_API_VERSIONS]
    assert core
    for obj in core:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_validation_catches_a_misspelled_field_and_a_broken_rule() -> None:
    pool = copy.deepcopy(render("default").one("InferencePool"))
    pool["spec"]["targetPorts"] = [{"number": 8200}, {"number": 8200}]
    ref = pool["spec"]["endpointPickerRef"]
    ref["portNumber"] = ref.pop("port")["number"]
    assert any("portNumber" in e for e in crd_errors(pool))
    failures = cel_failures(pool)
    assert len(failures) == 2 and any("targetPorts" in f for f in failures), failures
    deployment = copy.deepcopy(render("default").one("Deployment"))
    deployment["spec"]["template"]["spec"]["serviceAcountName"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_every_object_is_of_a_validated_kind(manifests: Manifests) -> None:
    for obj in manifests.objects:
        assert obj["apiVersion"] in CORE_API_VERSIONS or (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS, obj["kind"]


def test_names_labels_and_values_are_well_formed(manifests: Manifests) -> None:
    for obj in manifests.objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 253 and _DNS_SUBDOMAIN.match(name), name
        if obj["kind"] == "Service":
            assert len(name) <= 63 and _DNS_LABEL.match(name), name
        assert list(nulls(obj)) == [], f"{obj['kind']} {name} has empty values"
        for where, labels in all_label_maps(obj):
            assert label_errors(labels, f"{obj['kind']}{where}") == []
    # KubeRay names the cluster <name>-<5 chars> and its head Service <cluster>-head-svc.
    ray_service = manifests.one("RayService")["metadata"]["name"]
    assert len(f"{ray_service}-xxxxx-head-svc") <= 63 and _DNS_LABEL.match(ray_service)


_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME


def test_pod_templates_pass_the_api_servers_pod_rules(manifests: Manifests) -> None:
    """Rules the API server enforces on pods that no OpenAPI schema carries."""
    for who, template in manifests.pod_templates():
        spec = template["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        assert len(volumes) == len(spec.get("volumes", [])), f"{who}: duplicate volume names"
        seen_ports: set[tuple[int, str]] = set()
        for container in spec["containers"]:
            names = [p["name"] for p in container.get("ports", [])]
            assert len(names) == len(set(names)), f"{who}: duplicate port names {names}"
            for port in container.get("ports", []):
                assert len(port["name"]) <= 15 and _PORT_NAME.match(port["name"]), f"{who}: port name {port['name']!r}"
                key = (port["containerPort"], port.get("protocol", "TCP"))
                assert key not in seen_ports, f"{who}: port {key} twice"
                seen_ports.add(key)
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{who}: mount of undefined volume {mount['name']!r}"
            for env in container.get("env", []):
                assert re.match(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", env["name"]), f"{who}: env {env['name']!r}"
                for ref in re.findall(r"\$\(([^)]*)\)", env.get("value", "")):
                    earlier = [e["name"] for e in container["env"]][: container["env"].index(env)]
                    assert ref in earlier, f"{who}: {env['name']} refers to $({ref}) before it is defined"


# --- the Ray side ------------------------------------------------------------------------------


_SERVE_APP_MODULE = ROOT / "deployments" / "app.py"


@pytest.mark.xfail(
    not _SERVE_APP_MODULE.exists(), strict=True,
    reason="deployments/app.py (the Serve application and its build_app) is not written yet",
)
def test_serve_config_imports_build_app_from_the_repository(manifests: Manifests) -> None:
    import_path = manifests.serve_app["import_path"]
    module, _, attr = import_path.partition(":")
    assert (module, attr) == ("deployments.app", "build_app")
    source = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert source.is_file(), f"{import_path}: {source.relative_to(ROOT)} does not exist"
    defined = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert attr in defined, f"{source.relative_to(ROOT)} defines no top-level {attr}()"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1-style fields
def test_serve_config_is_a_valid_ray_serve_config(manifests: Manifests) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(manifests.serve_config)
    (app,) = config.applications
    assert (app.name, app.route_prefix) == ("disagg", "/")


def test_serve_args_parse_as_app_config_and_follow_the_values(manifests: Manifests) -> None:
    v, cfg = manifests.values, manifests.app_config
    assert cfg.model == v["model"]["path"]
    assert cfg.served_model_name == (v["model"]["servedName"] or None)
    assert cfg.block_size == v["engine"]["blockSize"]
    assert cfg.max_model_len == v["model"]["maxModelLen"]
    assert cfg.enforce_eager is v["engine"]["enforceEager"]
    assert cfg.kv_backend == v["engine"]["kvBackend"]
    # Explicit values win over the `config` passthrough; other passthrough fields land.
    assert cfg.routing.pd_threshold_tokens == v["routing"]["pdThresholdTokens"]
    for key, value in v["config"].items():
        if key != "routing":
            assert getattr(cfg, key) == value, key
    for key, value in v["config"].get("routing", {}).items():
        if key != "pd_threshold_tokens":
            assert getattr(cfg.routing, key) == value, key
    assert (cfg.host, cfg.port) == ("0.0.0.0", v["serve"]["port"])
    proxy = manifests.serve_config["http_options"]
    assert (proxy["host"], proxy["port"]) == ("0.0.0.0", cfg.port)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic v1-style fields
@pytest.mark.parametrize("name", ["default", "multi-replica-gpu"])
def test_serve_places_each_engine_on_its_worker_group(name: str) -> None:
    """Build the Serve application from the rendered args as KubeRay's Serve controller would,
    and check each engine deployment asks for what its worker group's pods offer."""
    from ray.serve._private.build_app import build_app as build_serve_app  # Ray is pinned (2.60)

    from deployments.app import build_app

    m = render(name)
    built = {d.name: d for d in build_serve_app(build_app(m.serve_app["args"]), name="disagg").deployments}
    for role, deployment in (("prefill", "PrefillServer"), ("decode", "DecodeServer")):
        options = built[deployment].ray_actor_options
        assert built[deployment].num_replicas == m.worker_group(role)["replicas"]
        assert options.get("num_gpus", 0) == m.values[role]["gpus"]
        if "resources" not in options:
            pytest.xfail(f"deployments/app.py does not pass RoleConfig.ray_resources to {deployment}'s "
                         "ray_actor_options: engines are not pinned to their worker groups")
        assert options["resources"] == json.loads(json.loads(m.worker_group(role)["rayStartParams"]["resources"]))


def test_endpoint_picker_config_is_the_serve_args(manifests: Manifests) -> None:
    cm = [c for c in manifests.of_kind("ConfigMap") if "config.yaml" in c["data"]]
    assert len(cm) == 1
    assert yaml.safe_load(cm[0]["data"]["config.yaml"]) == manifests.serve_app["args"]


@pytest.mark.parametrize("role", ROLES)
def test_each_worker_pod_runs_exactly_one_engine_of_its_role(manifests: Manifests, role: str) -> None:
    v, group = manifests.values, manifests.worker_group(role)
    role_cfg = getattr(manifests.app_config, role)
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == v[role]["replicas"] == role_cfg.replicas
    # rayStartParams carries the resources as a JSON object in one more layer of quotes.
    raw = group["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    advertised = json.loads(json.loads(raw))
    assert advertised == {f"disagg_{role}": 1}
    assert role_cfg.ray_resources == {f"disagg_{role}": 1.0}
    other = "decode" if role == "prefill" else "prefill"
    assert f"disagg_{role}" not in json.loads(json.loads(manifests.worker_group(other)["rayStartParams"]["resources"]))
    assert role_cfg.cpu_bind == [], "pods own their cores: no engine thread pinning"


@pytest.mark.parametrize("role", ROLES)
def test_worker_gpus_match_what_the_engine_reserves(manifests: Manifests, role: str) -> None:
    v, group = manifests.values, manifests.worker_group(role)
    gpus = v[role]["gpus"]
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert getattr(manifests.app_config, role).ray_num_gpus == gpus
    assert group["rayStartParams"]["num-gpus"] == str(gpus)
    if gpus:
        assert resources["limits"][v["gpuResourceName"]] == gpus == resources["requests"][v["gpuResourceName"]]
    else:
        assert v["gpuResourceName"] not in resources.get("limits", {})
    assert manifests.cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("role", ROLES)
def test_worker_pods_carry_their_role_and_expose_the_worker_and_metrics_ports(manifests: Manifests, role: str) -> None:
    v, group = manifests.values, manifests.worker_group(role)
    template = group["template"]
    assert template["metadata"]["labels"]["disagg.io/role"] == role
    assert container_port(template, "worker") == getattr(manifests.app_config, role).http_port == v["workerPort"]
    assert container_port(template, "metrics") == int(group["rayStartParams"]["metrics-export-port"]) == v["ray"]["metricsPort"]
    assert container_port(template, "serve") == manifests.serve_config["http_options"]["port"]
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["value"] == "$(POD_IP)"


def test_head_exposes_dashboard_serve_and_metrics_ports(manifests: Manifests) -> None:
    v, head = manifests.values, manifests.cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0"
    assert container_port(head["template"], "dashboard") == int(params["dashboard-port"]) == v["ray"]["dashboardPort"] == 8265
    assert container_port(head["template"], "metrics") == int(params["metrics-export-port"]) == v["ray"]["metricsPort"]
    assert container_port(head["template"], "serve") == manifests.app_config.port
    assert "disagg.io/role" not in head["template"]["metadata"]["labels"]


def test_head_tells_the_ray_dashboard_where_grafana_and_prometheus_are(manifests: Manifests) -> None:
    mon = manifests.values["monitoring"]
    env = {e["name"]: e.get("value") for e in manifests.cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    for var, key in (("RAY_GRAFANA_HOST", "grafanaHost"), ("RAY_GRAFANA_IFRAME_HOST", "grafanaIframeHost"),
                     ("RAY_PROMETHEUS_HOST", "prometheusHost")):
        assert env.get(var) == (mon[key] or None)


def test_model_volume_is_mounted_in_every_ray_pod(manifests: Manifests) -> None:
    storage = manifests.values["model"]["storage"]
    for who, template in manifests.pod_templates():
        if who not in ("head", *ROLES):
            continue
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        volumes = {vol["name"]: vol for vol in template["spec"]["volumes"]}
        assert set(mounts) <= set(volumes), who
        if storage["volume"]:
            assert mounts["model"]["mountPath"] == storage["mountPath"] and mounts["model"]["readOnly"], who
            assert manifests.app_config.model.startswith(storage["mountPath"].rstrip("/") + "/")
        else:
            assert "model" not in mounts, who


# --- the gateway side --------------------------------------------------------------------------


def test_gateway_off_renders_no_gateway_objects() -> None:
    kinds = {o["kind"] for o in render("gateway-off").objects}
    assert kinds.isdisjoint({"InferencePool", "HTTPRoute", "Gateway", "Deployment", "Service", "Role", "DestinationRule"})


def test_inference_pool_selects_the_decode_pods_and_nothing_else(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    selector = m.one("InferencePool")["spec"]["selector"]["matchLabels"]
    chosen = {who for who, t in m.pod_templates() if selects(selector, t["metadata"]["labels"])}
    assert chosen == {"decode"}


def test_inference_pool_targets_the_decode_workers_http_port(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    pool = m.one("InferencePool")["spec"]
    assert [p["number"] for p in pool["targetPorts"]] == [m.app_config.decode.http_port]
    assert container_port(m.worker_group("decode")["template"], "worker") == m.app_config.decode.http_port
    assert pool["appProtocol"] == "http"


def test_endpoint_picker_ref_names_the_epp_service_and_its_grpc_port(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    ref = m.one("InferencePool")["spec"]["endpointPickerRef"]
    assert (ref["group"], ref["kind"]) == ("", "Service")
    assert ref["failureMode"] == m.values["gateway"]["failureMode"]
    service = m.named("Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    deployment = m.one("Deployment")
    template = deployment["spec"]["template"]
    # The Service reaches the picker's ext_proc gRPC port on the picker's pods.
    assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    assert container_port(template, port["targetPort"]) == m.values["epp"]["grpcPort"] == 9002
    assert selects(deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"])
    for who, other in m.pod_templates():
        if who != deployment["metadata"]["name"]:
            assert not selects(service["spec"]["selector"], other["metadata"]["labels"]), who


def test_epp_service_exposes_grpc_health_and_metrics(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    epp = m.values["epp"]
    template = m.one("Deployment")["spec"]["template"]
    ports = {p["name"]: p for p in m.one("Service")["spec"]["ports"]}
    assert {n: p["port"] for n, p in ports.items()} == {
        "grpc-ext-proc": epp["grpcPort"], "grpc-health": epp["healthPort"], "metrics": epp["metricsPort"]}
    # HTTP/2 on both gRPC ports, as GIE's chart declares the ext_proc port (TLS or not).
    assert ports["grpc-ext-proc"]["appProtocol"] == ports["grpc-health"]["appProtocol"] == "http2"
    assert (epp["grpcPort"], epp["healthPort"], epp["metricsPort"]) == (9002, 9003, 9090)
    for port in ports.values():
        assert container_port(template, port["targetPort"]) == port["port"]


def test_epp_discovers_the_workers_by_pod_label(gateway_manifests: Manifests) -> None:
    from disagg.epp.cli import parse_args

    m = gateway_manifests
    (container,) = m.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["disagg", "epp"]
    # The picker's own parser takes the args (an unknown flag exits).
    args = parse_args(container["args"])
    selector = parse_selector(args.k8s_selector)
    chosen = {who for who, t in m.pod_templates() if selects(selector, t["metadata"]["labels"])}
    assert chosen == set(ROLES)
    for role in ROLES:
        assert m.worker_group(role)["template"]["metadata"]["labels"][args.k8s_role_label] == role
    assert args.k8s_port == m.app_config.prefill.http_port == m.app_config.decode.http_port
    assert args.k8s_namespace == "$(POD_NAMESPACE)"
    assert {e["name"] for e in container["env"]} >= {"POD_NAMESPACE"}
    template = m.one("Deployment")["spec"]["template"]
    assert args.grpc_port == container_port(template, ext_proc_port_name(m))
    assert args.health_port == container_port(template, "grpc-health")
    assert args.metrics_port == container_port(template, "metrics")
    assert args.host == "0.0.0.0"
    mounts = {vm["mountPath"] for vm in container["volumeMounts"]}
    assert str(Path(args.config).parent) in mounts


def test_epp_probes_ask_grpc_health_for_liveness_and_readiness(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    (container,) = m.one("Deployment")["spec"]["template"]["spec"]["containers"]
    health = m.values["epp"]["healthPort"]
    assert container["livenessProbe"]["grpc"] == {"port": health, "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": health, "service": "readiness"}


def test_epp_rbac_lets_it_list_and_watch_pods(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    pod_spec = m.one("Deployment")["spec"]["template"]["spec"]
    account = m.named("ServiceAccount", pod_spec["serviceAccountName"])
    binding = m.one("RoleBinding")
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE} in binding["subjects"]
    assert (binding["roleRef"]["apiGroup"], binding["roleRef"]["kind"]) == ("rbac.authorization.k8s.io", "Role")
    role = m.named("Role", binding["roleRef"]["name"])
    allowed = {
        verb
        for rule in role["rules"]
        if "" in rule["apiGroups"] and ("pods" in rule["resources"] or "*" in rule["resources"])
        for verb in rule["verbs"]
    }
    assert {"get", "list", "watch"} <= allowed or "*" in allowed
    # Least privilege: read-only, pods only.
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in role["rules"])


def test_http_route_sends_gateway_traffic_to_the_pool(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    route = m.one("HTTPRoute")["spec"]
    (parent,) = route["parentRefs"]
    gateway = m.values["gateway"]
    if gateway["create"]:
        gw = m.one("Gateway")
        assert parent["name"] == gw["metadata"]["name"]
        assert gw["spec"]["gatewayClassName"] == gateway["className"]
        assert [lst["port"] for lst in gw["spec"]["listeners"]] == [gateway["listenerPort"]]
    else:
        assert parent["name"] == gateway["name"] and not m.of_kind("Gateway")
    (rule,) = route["rules"]
    # The public OpenAI paths only, exactly: the workers' internal endpoints are not routed.
    assert rule["matches"] == [{"path": {"type": "Exact", "value": path}}
                               for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")]
    (backend,) = rule["backendRefs"]
    pool = m.one("InferencePool")
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    if gateway.get("requestTimeout"):
        assert rule["timeouts"]["request"] == gateway["requestTimeout"]
    else:
        assert "timeouts" not in rule


# --- the workers' ports stay internal ---------------------------------------------------------


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def admitted(m: Manifests, pod_labels: dict[str, str], source: dict[str, str] | None, port: int) -> bool:
    """Whether the release's NetworkPolicies let a pod with `source` labels, in the release's
    namespace (None: an address that is no pod), reach `port` of a pod with `pod_labels`. Every
    selector the chart renders is matchLabels: no expressions to evaluate."""
    policies = [p["spec"] for p in m.of_kind("NetworkPolicy") if matches(p["spec"]["podSelector"]["matchLabels"],
                                                                         pod_labels)]
    if not policies:
        return True  # no policy selects the pod: Kubernetes admits everything
    for spec in policies:
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec.get("ingress", []):
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                # A pod selector alone means this namespace, with `namespaceSelector: {}` any: both
                # admit a source here. A namespace selector alone or an ipBlock admits no source here.
                if source is not None and "podSelector" in peer and matches(peer["podSelector"].get("matchLabels", {}),
                                                                            source):
                    return True
    return False


def worker_labels(m: Manifests, role: str) -> dict[str, str]:
    return m.worker_group(role)["template"]["metadata"]["labels"]


def internal_ports(m: Manifests) -> list[int]:
    """The worker pods' internal ports: the worker endpoint, and stand-ins for the ports taken at
    start (KV events, the load channel, the KV transfer control port, NIXL's side channel) and
    Ray's own (raylet, object manager, workers)."""
    return [m.values["workerPort"], 5557, 5600, 6379, 10002, 40000]


@pytest.mark.parametrize("role", ROLES)
def test_only_the_releases_pods_reach_the_workers_internal_ports(manifests: Manifests, role: str) -> None:
    m = manifests
    if not m.values["networkPolicy"]["enabled"]:
        pytest.skip("networkPolicy.enabled=false: the network plugin's defaults apply")
    pod = worker_labels(m, role)
    head = m.cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    sources = {"head (GCS, router)": head, "prefill": worker_labels(m, "prefill"), "decode": worker_labels(m, "decode")}
    for deployment in m.of_kind("Deployment"):
        sources["endpoint picker"] = deployment["spec"]["template"]["metadata"]["labels"]
    other_release = {**head, "app.kubernetes.io/instance": "other"}
    for port in internal_ports(m):
        for who, labels in sources.items():
            assert admitted(m, pod, labels, port), f"{who} cannot reach {role}:{port}"
        assert not admitted(m, pod, {"app": "curl"}, port), f"any pod reaches {role}:{port}"
        assert not admitted(m, pod, other_release, port), f"another release reaches {role}:{port}"
        assert not admitted(m, pod, None, port), f"any address reaches {role}:{port}"
    # Public anyway: Ray Serve's proxy on every node, and Ray's Prometheus export.
    for port in (m.values["serve"]["port"], m.values["ray"]["metricsPort"]):
        assert admitted(m, pod, {"app": "prometheus"}, port) and admitted(m, pod, None, port)


def test_the_gateway_reaches_the_decode_workers_port_and_nothing_else(gateway_manifests: Manifests) -> None:
    m = gateway_manifests
    if not m.values["networkPolicy"]["enabled"]:
        pytest.skip("networkPolicy.enabled=false")
    gateway_from = m.values["networkPolicy"]["gatewayFrom"]
    (policy,) = [p for p in m.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith("-gateway")]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": m.values["workerPort"]}]
    if gateway_from:
        assert rule["from"] == gateway_from
        return
    gateway_pod = {"gateway.networking.k8s.io/gateway-name": m.values["gateway"]["name"] or m.one("RayService")[
        "metadata"]["name"]}
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": gateway_pod}}]
    assert admitted(m, worker_labels(m, "decode"), gateway_pod, m.values["workerPort"])
    for port in internal_ports(m)[1:]:
        assert not admitted(m, worker_labels(m, "decode"), gateway_pod, port)
    for port in internal_ports(m):
        assert not admitted(m, worker_labels(m, "prefill"), gateway_pod, port)


def test_extra_ingress_rules_are_added_to_the_workers_policy() -> None:
    m = render("managed-gateway")
    (workers,) = [p for p in m.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith("-workers")]
    assert workers["spec"]["ingress"][-1] == m.values["networkPolicy"]["extraIngress"][0]


def test_gateway_off_renders_no_gateway_policy() -> None:
    names = [p["metadata"]["name"] for p in render("gateway-off").of_kind("NetworkPolicy")]
    assert names == [f"{render('gateway-off').one('RayService')['metadata']['name']}-workers"]


def test_the_workers_share_the_internal_token_of_the_charts_secret() -> None:
    m = render("default")
    (secret,) = m.of_kind("Secret")
    assert secret["type"] == "Opaque" and len(base64.b64decode(secret["data"]["token"])) >= 32
    for role in ROLES:
        env = {e["name"]: e for e in m.worker_group(role)["template"]["spec"]["containers"][0]["env"]}
        assert env["DISAGG_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": "token"}
    # Not in the Serve args, which anyone who may read the RayService reads.
    assert m.app_config.internal_token is None
    # The head and the picker do not call /internal/prefill: they do not get it.
    head_env = m.cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert "DISAGG_INTERNAL_TOKEN" not in [e["name"] for e in head_env]
    assert "DISAGG_INTERNAL_TOKEN" not in [e["name"] for e in epp_container(m).get("env", [])]
    # Each install draws its own.
    assert render_values({})["Secret"]["data"]["token"] != secret["data"]["token"]


def test_a_secret_of_ones_own_holds_the_token_and_the_chart_makes_none() -> None:
    m = render("own-token-no-policy")
    assert not m.of_kind("Secret")
    for role in ROLES:
        env = {e["name"]: e for e in m.worker_group(role)["template"]["spec"]["containers"][0]["env"]}
        assert env["DISAGG_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "llm-internal"


def render_values(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A fresh (uncached) render, its objects by kind (the last of each)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return {doc["kind"]: doc for text in files.values() for doc in yaml.safe_load_all(text) if doc}


# --- TLS on the endpoint picker's ext_proc port ---------------------------------------------------


def ext_proc_port_name(m: Manifests) -> str:
    """The container port the EPP Service's ext_proc port targets."""
    (port,) = [p for p in m.one("Service")["spec"]["ports"] if p["name"] == "grpc-ext-proc"]
    return port["targetPort"]


def epp_container(m: Manifests) -> dict[str, Any]:
    (container,) = m.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def secret_volumes(m: Manifests) -> list[dict[str, Any]]:
    return [v for v in m.one("Deployment")["spec"]["template"]["spec"]["volumes"] if "secret" in v]


def test_epp_serves_ext_proc_over_tls_by_default_with_its_self_signed_certificate() -> None:
    from disagg.epp.cli import parse_args

    m = render("default")
    container = epp_container(m)
    assert "--secure-serving=true" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--cert-path")]
    args = parse_args(container["args"])
    assert args.secure_serving is True and args.cert_path is None
    assert secret_volumes(m) == []
    assert ext_proc_port_name(m) == "ext-proc-tls"
    # The default gateway class is Istio's: it is told to speak TLS to the EPP, without verifying
    # a self-signed certificate.
    (rule,) = m.of_kind("DestinationRule")
    assert rule["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}


def test_epp_serves_the_certificate_of_its_secret_mounted_read_only() -> None:
    from disagg.epp.cli import parse_args

    m = render("epp-tls-secret")
    container = epp_container(m)
    (volume,) = secret_volumes(m)
    assert volume["secret"] == {"secretName": "llm-epp-tls"} == {"secretName": m.values["epp"]["tls"]["certSecretName"]}
    (mount,) = [vm for vm in container["volumeMounts"] if vm["name"] == volume["name"]]
    assert mount["readOnly"] is True
    args = parse_args(container["args"])
    assert args.secure_serving is True
    assert args.cert_path == Path(mount["mountPath"]) == Path("/etc/disagg-epp-tls")
    # Beside the config mount, not inside it: a volume nested in a configMap volume is fragile.
    config_dir = Path(args.config).parent
    assert not args.cert_path.is_relative_to(config_dir) and not config_dir.is_relative_to(args.cert_path)
    assert ext_proc_port_name(m) == "ext-proc-tls"


def test_secure_serving_false_serves_plaintext_h2c() -> None:
    from disagg.epp.cli import parse_args

    m = render("epp-plaintext")
    container = epp_container(m)
    assert "--secure-serving=false" in container["args"]
    args = parse_args(container["args"])
    assert args.secure_serving is False and args.cert_path is None
    assert secret_volumes(m) == [] and not m.of_kind("DestinationRule")
    assert ext_proc_port_name(m) == "ext-proc-h2c"


def test_epp_tls_follows_the_values_and_the_probes_stay_plaintext(gateway_manifests: Manifests) -> None:
    from disagg.epp.cli import parse_args

    m = gateway_manifests
    tls, epp = m.values["epp"]["tls"], m.values["epp"]
    container = epp_container(m)
    args = parse_args(container["args"])
    assert args.secure_serving is tls["secureServing"]
    assert (args.cert_path is not None) == bool(tls["certSecretName"]) == bool(secret_volumes(m))
    assert ext_proc_port_name(m) == ("ext-proc-tls" if tls["secureServing"] else "ext-proc-h2c")
    # The kubelet's gRPC probes speak plaintext: they ask the health port, never the ext_proc one.
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["grpc"]["port"] == args.health_port == epp["healthPort"] != args.grpc_port


def istio_tls(v: dict) -> bool:
    """Whether the chart must make an Istio gateway speak TLS to the EPP: a TLS EPP behind an
    Istio gateway class (the default class, or one the values say is Istio)."""
    tls = v["epp"]["tls"]
    return bool(v["gateway"]["enabled"] and tls["secureServing"]
                and (tls["istioDestinationRule"] or v["gateway"]["className"] == "istio"))


def test_destination_rule_renders_only_for_a_tls_epp_behind_istio(manifests: Manifests) -> None:
    assert len(manifests.of_kind("DestinationRule")) == (1 if istio_tls(manifests.values) else 0)


@pytest.mark.parametrize("name", ISTIO_TLS_SETS)
def test_destination_rule_makes_the_gateway_speak_tls_to_the_ext_proc_port_only(name: str) -> None:
    m = render(name)
    ref = m.one("InferencePool")["spec"]["endpointPickerRef"]
    service = m.named("Service", ref["name"])
    rule = m.one("DestinationRule")
    assert rule["metadata"]["name"] == service["metadata"]["name"]
    spec = rule["spec"]
    host = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert spec["host"] == host
    # One port-level policy, for the port the InferencePool names: health and metrics stay plaintext.
    assert set(spec) == {"host", "trafficPolicy"} and set(spec["trafficPolicy"]) == {"portLevelSettings"}
    (setting,) = spec["trafficPolicy"]["portLevelSettings"]
    assert setting["port"] == {"number": ref["port"]["number"]} == {"number": m.values["epp"]["grpcPort"]}
    tls = setting["tls"]
    secret = m.values["epp"]["tls"]["certSecretName"]
    if secret:
        # Verified against the mounted Secret's CA, for the Service's name.
        assert tls == {"mode": "SIMPLE", "credentialName": secret, "sni": host,
                       "subjectAltNames": [host, host.removesuffix(".cluster.local")]}
        assert [v["secret"]["secretName"] for v in secret_volumes(m)] == [secret]
    else:
        # GIE's documented rule for the self-signed certificate: nothing to verify it against.
        assert tls == {"mode": "SIMPLE", "insecureSkipVerify": True}


def test_destination_rule_validation_catches_a_wrong_field_and_value() -> None:
    rule = copy.deepcopy(render("epp-tls-secret").one("DestinationRule"))
    skip_without_crds([rule])
    assert crd_errors(rule) == []
    tls = rule["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]
    tls["caCertificate"] = tls.pop("credentialName")
    tls["mode"] = "TLS"
    errors = crd_errors(rule)
    assert any("caCertificate" in e for e in errors), errors
    assert any(e.endswith("'TLS' is not one of ['DISABLE', 'SIMPLE', 'MUTUAL', 'ISTIO_MUTUAL']") for e in errors), errors


# --- the dashboard ConfigMap ---------------------------------------------------------------------


def test_grafana_dashboard_configmap_holds_the_monitoring_dashboard() -> None:
    m = render("cpu-only")
    (cm,) = [c for c in m.of_kind("ConfigMap") if "disagg-dashboard.json" in c["data"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = json.loads((ROOT / "k8s" / "monitoring" / "grafana" / "disagg-dashboard.json").read_text())
    assert json.loads(cm["data"]["disagg-dashboard.json"]) == on_disk


# --- the plain rendered examples ---------------------------------------------------------------


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("k8s_render", ROOT / "k8s" / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_examples_are_the_charts_output() -> None:
    render_module = _render_module()
    assert render_module.EXAMPLES
    for file, (name, namespace, values) in render_module.EXAMPLES.items():
        on_disk = (ROOT / "k8s" / "rendered" / file).read_text()
        assert on_disk == render_module.render(copy.deepcopy(values), name=name, namespace=namespace), (
            f"k8s/rendered/{file} is stale: run `python k8s/render.py --examples`")


def test_several_picker_replicas_share_their_picks_and_keep_all_but_one_up() -> None:
    from disagg.epp.cli import parse_args

    m = render("multi-replica-gpu")
    assert m.values["epp"]["replicas"] == 2
    container = epp_container(m)
    args = parse_args(container["args"])
    deployment = next(d for d in m.of_kind("Deployment") if d["spec"]["template"]["spec"]["containers"][0] is container)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    # The peers are the picker's own pods, found by its pods' labels, on the peer port.
    selector = dict(part.split("=", 1) for part in args.k8s_peer_selector.split(","))
    assert selector.items() <= pod_labels.items() and selector["app.kubernetes.io/component"] == "epp"
    assert args.peer_port == m.values["epp"]["peerPort"] == 9004
    assert {"name": "epp-peers", "containerPort": 9004, "protocol": "TCP"} in container["ports"]
    assert any(e["name"] == "POD_NAME" for e in container["env"]) and "--replica-id=$(POD_NAME)" in container["args"]
    (pdb,) = m.of_kind("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_one_picker_replica_has_no_peers_and_no_disruption_budget() -> None:
    m = render("default")
    assert not [a for a in epp_container(m)["args"] if a.startswith(("--peer", "--k8s-peer"))]
    assert not m.of_kind("PodDisruptionBudget")
