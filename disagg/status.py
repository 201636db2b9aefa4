"""`disagg status`: the pool as a terminal table, from a running stack's router or an EPP."""

from __future__ import annotations

import argparse
import sys

import httpx


def fetch_pool(url: str) -> list[dict]:
    """The router's `GET /v1/pool` (the EPP's HTTP port serves the same path)."""
    r = httpx.get(f"{url.rstrip('/')}/v1/pool", timeout=5)
    r.raise_for_status()
    return r.json()


def health(address: str) -> str:
    try:
        return "ok" if httpx.get(f"http://{address}/health", timeout=2).status_code == 200 else "unhealthy"
    except httpx.HTTPError:
        return "unreachable"


def render(pool: list[dict], healths: dict[str, str]) -> str:
    head = ("ROLE", "ADDRESS", "ENGINE", "WAITING", "RUNNING", "KV USE", "SIGNAL AGE", "HEALTH")
    rows = [head]
    for w in sorted(pool, key=lambda w: (w["role"] != "decode", w["address"])):
        rows.append((w["role"], w["address"], w["engine_id"], str(w.get("waiting", 0)), str(w.get("running", 0)),
                     f"{100 * w.get('kv_usage', 0.0):.1f}%", f"{w.get('signal_age_s', 0.0):.2f}s",
                     healths.get(w["address"], "?")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg status", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="router (or EPP HTTP) URL")
    args = p.parse_args(argv)
    try:
        pool = fetch_pool(args.url)
    except (httpx.HTTPError, ValueError) as e:
        print(f"disagg status: cannot read the pool from {args.url}: {e}", file=sys.stderr)
        return 1
    if not pool:
        print("no workers in the pool")
        return 0
    print(render(pool, {w["address"]: health(w["address"]) for w in pool}))
    return 0
