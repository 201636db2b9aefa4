"""`disagg status`: the pool as a terminal table, from a running stack's router or an EPP."""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp


async def fetch_pool(url: str) -> tuple[list[dict], dict[str, str]]:
    """The router's `GET /v1/pool` (the EPP's HTTP port serves the same path), and each worker's
    health by address."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"{url.rstrip('/')}/v1/pool") as response:
            response.raise_for_status()
            pool = await response.json()
        healths = await asyncio.gather(*(health(session, w["address"]) for w in pool))
    return pool, {w["address"]: h for w, h in zip(pool, healths)}


async def health(session: aiohttp.ClientSession, address: str) -> str:
    try:
        async with session.get(f"http://{address}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
            return "ok" if response.status == 200 else "unhealthy"
    except (aiohttp.ClientError, TimeoutError):
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
        pool, healths = asyncio.run(fetch_pool(args.url))
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        print(f"disagg status: cannot read the pool from {args.url}: {e}", file=sys.stderr)
        return 1
    if not pool:
        print("no workers in the pool")
        return 0
    print(render(pool, healths))
    return 0
