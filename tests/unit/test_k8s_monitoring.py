"""k8s/monitoring: the Grafana dashboard, the PodMonitor and the plain scrape config.

The dashboard follows the conventions of the dashboards Ray generates and embeds (a hidden
`datasource` variable and a `SessionName` variable, which the Ray dashboard passes as
var-datasource / var-SessionName in its d-solo iframe URLs; stable integer panel ids), and
queries names that exist: vLLM's in the installed vLLM, disagg_* in this repository. The
PodMonitor and the scrape config select the pods the chart renders, on ports those pods have.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "disagg-dashboard.json"
CHART = ROOT / "k8s" / "chart"

# What the dashboard must show (issue 5, point 4), by the series that carry it.
REQUIRED_SERIES = {
    "P/D decisions": "disagg_pd_decisions_total",
    "TTFT by role": "vllm:time_to_first_token_seconds_bucket",
    "ITL by role": "vllm:inter_token_latency_seconds_bucket",
    "KV transfer throughput": "disagg_kv_transfer_bytes_total",
    "KV transfer failures": "disagg_kv_transfer_failures_total",
    "prefix hit rate": "disagg_prefix_hit_tokens_total",
    "queue depth per worker": "vllm:num_requests_waiting",
    "signal freshness": "disagg_endpoint_signal_age_seconds",
}
_SUFFIXES = ("_bucket", "_count", "_sum", "_total")
# Matches both a direct scrape and Ray's metrics export, which prefixes `ray_`.
_NAME_MATCHER = re.compile(r'__name__=~"\(ray_\)\?([a-zA-Z_:][a-zA-Z0-9_:]*)"')


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queried_series() -> set[str]:
    return {name for p in panels() for t in p["targets"] for name in _NAME_MATCHER.findall(t["expr"])}


def base_name(series: str) -> str:
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


@cache
def rendered_pod_templates() -> dict[str, dict[str, Any]]:
    """Pod templates of the chart's default render, by who runs them."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render({}, name="demo", namespace="serving", is_install=True)
    docs = [d for text in files.values() for d in yaml.safe_load_all(text) if d]
    (ray_service,) = [d for d in docs if d["kind"] == "RayService"]
    cluster = ray_service["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    out.update({d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"})
    return out


def port_names(template: dict[str, Any]) -> set[str]:
    return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def prometheus_label(pod_label: str) -> str:
    """The name Kubernetes service discovery gives a pod label (non-alphanumerics become _)."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", pod_label)


# --- dashboard ---------------------------------------------------------------------------------


def test_dashboard_has_the_variables_the_ray_dashboard_passes() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["SessionName"]["type"] == "query"
    assert d["uid"] == "disaggDashboard" and d["title"]


def test_every_panel_queries_through_the_datasource_variable() -> None:
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'SessionName=~"$SessionName|"' in t["expr"], (p["title"], t["expr"])


def test_panels_have_unique_ids_and_fit_the_grid() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in dashboard()["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]


def test_queries_are_balanced_promql() -> None:
    for p in panels():
        for t in p["targets"]:
            expr = t["expr"]
            for open_, close in ("()", "{}", "[]"):
                assert expr.count(open_) == expr.count(close), (p["title"], expr)
            assert expr.count('"') % 2 == 0, (p["title"], expr)
            assert _NAME_MATCHER.search(expr), f"{p['title']}: no series matched by name: {expr}"


@pytest.mark.parametrize("what", list(REQUIRED_SERIES))
def test_dashboard_shows(what: str) -> None:
    assert REQUIRED_SERIES[what] in queried_series()


def test_dashboard_groups_latency_and_queue_depth_by_role() -> None:
    for series in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:num_requests_waiting"):
        exprs = [t["expr"] for p in panels() for t in p["targets"] if series in t["expr"]]
        assert exprs, series
        for expr in exprs:
            (grouping,) = re.findall(r"\bby \(([^)]*)\)", expr)
            assert "role" in {g.strip() for g in grouping.split(",")}, expr


def test_vllm_series_exist_in_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed in this environment"
    metrics_dir = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics"
    defined = set(re.findall(r'"(vllm:[a-z_]+)"', "".join(p.read_text() for p in metrics_dir.glob("*.py"))))
    used = {base_name(s) for s in queried_series() if s.startswith("vllm:")}
    assert used and used <= defined, sorted(used - defined)


def _defined_disagg_metrics() -> set[str]:
    sources = [p for d in ("disagg", "kv_transfer", "deployments") for p in (ROOT / d).rglob("*.py")]
    text = "".join(p.read_text() for p in sources)
    return set(re.findall(r'"(disagg_[a-z_]+)"', text))


_MISSING_DISAGG = {base_name(s) for s in queried_series() if s.startswith("disagg_")} - _defined_disagg_metrics()


@pytest.mark.xfail(
    bool(_MISSING_DISAGG), strict=True,
    reason=f"not defined in the code yet (issue 5, point 3): {sorted(_MISSING_DISAGG)}",
)
def test_disagg_series_are_defined_in_the_code() -> None:
    assert not _MISSING_DISAGG, sorted(_MISSING_DISAGG)


# --- PodMonitor and scrape config ---------------------------------------------------------------


def test_pod_monitor_scrapes_every_chart_pod_on_a_port_it_has() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    pods = rendered_pod_templates()
    assert {"head", "prefill", "decode"} < set(pods)
    for who, template in pods.items():
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), who
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names(template), (who, endpoint["port"])


def test_pod_monitor_labels_series_with_the_pod_role() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    to_role = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "role"]
    assert [r["sourceLabels"] for r in to_role] == [[prometheus_label("disagg.io/role")]]
    for role in ("prefill", "decode"):
        assert rendered_pod_templates()[role]["metadata"]["labels"]["disagg.io/role"] == role


def test_scrape_config_keeps_the_chart_pods_metrics_ports() -> None:
    config = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert {"disagg-kubernetes", "disagg-ray", "disagg-epp"} <= set(jobs)
    relabels = jobs["disagg-kubernetes"]["relabel_configs"]
    keeps = {r["source_labels"][0]: re.compile(f"^(?:{r['regex']})$") for r in relabels if r.get("action") == "keep"}
    name_label, port_label = prometheus_label("app.kubernetes.io/name"), "__meta_kubernetes_pod_container_port_name"
    assert set(keeps) == {name_label, port_label}
    for who, template in rendered_pod_templates().items():
        assert keeps[name_label].match(template["metadata"]["labels"]["app.kubernetes.io/name"]), who
        assert any(keeps[port_label].match(p) for p in port_names(template)), who
    assert {"source_labels": [prometheus_label("disagg.io/role")], "target_label": "role"} in relabels
    for job in config["scrape_configs"]:
        for r in job.get("relabel_configs", []) + job.get("metric_relabel_configs", []):
            re.compile(r.get("regex", "(.*)"))


def _promtool_check(promtool: str, config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30)


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`): the scrape config is checked structurally only")
    config = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    # promtool also checks that file_sd files exist; give it an empty one.
    (tmp_path / "targets.json").write_text("[]")
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(tmp_path / "targets.json")]
    result = _promtool_check(promtool, config, tmp_path)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian builds Prometheus without Kubernetes service discovery: check those jobs'
        # relabelling with a static target in place of the discovery block.
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
        result = _promtool_check(promtool, config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`): PromQL is checked for balance only")
    # Grafana substitutes its variables before Prometheus sees a query; do the same.
    substitutions = {"$interval": "1m", "$SessionName": ".*", "$role": ".*"}
    rules = []
    for p in panels():
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in substitutions.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {p['title']}: {expr}"
            rules.append({"record": f"disagg:panel_{p['id']}_{t['refId'].lower()}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
