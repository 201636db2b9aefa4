"""Render the chart to plain manifests with Helm as a library (helm-python-sdk), no helm binary.

    python k8s/render.py [-f my-values.yaml] [--name disagg] [--namespace default] > disagg.yaml
    python k8s/render.py --examples     # rewrite k8s/rendered/*.yaml from the chart

The files in k8s/rendered/ are the chart's output for the value sets named in EXAMPLES; a test
(tests/unit/test_k8s_chart.py) fails when they drift from the chart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

K8S = Path(__file__).resolve().parent
CHART = K8S / "chart"
RENDERED = K8S / "rendered"
# Every example takes the workers' internal token from the Secret disagg-internal-token, made
# before they are applied: a Secret the chart makes holds a random token, which a file in the
# repository would publish (and would change at every render).
_TOKEN = {"internalToken": {"secretName": "disagg-internal-token"}}
# Example file name -> (release name, namespace, values).
EXAMPLES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "disagg.yaml": ("disagg", "default", {**_TOKEN}),
    "disagg-ray-only.yaml": ("disagg", "default", {**_TOKEN, "gateway": {"enabled": False}}),
    # The EPP serves the certificate of the Secret disagg-epp-tls (e.g. cert-manager's), and an
    # Istio DestinationRule makes the gateway speak TLS to it and verify it.
    "disagg-istio-tls.yaml": ("disagg", "default", {
        **_TOKEN, "epp": {"tls": {"certSecretName": "disagg-epp-tls", "istioDestinationRule": True}}}),
}


def render(values: dict[str, Any], *, name: str, namespace: str) -> str:
    """The chart's manifests as one multi-document YAML stream, in a stable order."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = [text.strip() for _, text in sorted(files.items()) if text.strip()]
    header = f"# Rendered from k8s/chart (release {name!r}, namespace {namespace!r}) by k8s/render.py: do not edit.\n"
    return header + "".join(f"---\n{doc}\n" for doc in docs)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)")
    parser.add_argument("--name", default="disagg", help="release name")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--examples", action="store_true", help="rewrite k8s/rendered/ from the chart")
    args = parser.parse_args(argv)
    if args.examples:
        RENDERED.mkdir(exist_ok=True)
        for file, (name, namespace, values) in EXAMPLES.items():
            (RENDERED / file).write_text(render(values, name=name, namespace=namespace))
            print(RENDERED / file)
        return 0
    values: dict[str, Any] = {}
    for path in args.values:  # later files win, as with helm -f a.yaml -f b.yaml
        values = _merge(values, yaml.safe_load(path.read_text()) or {})
    sys.stdout.write(render(values, name=args.name, namespace=args.namespace))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
