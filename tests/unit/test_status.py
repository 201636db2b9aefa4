"""`disagg status` renders the pool as a table."""

from disagg.status import render


def test_table_lists_decode_first_with_load_and_health():
    pool = [
        {"role": "prefill", "address": "10.0.0.2:8200", "engine_id": "engine-b", "waiting": 0, "running": 1,
         "kv_usage": 0.5, "signal_age_s": 0.12},
        {"role": "decode", "address": "10.0.0.1:8200", "engine_id": "engine-a", "waiting": 3, "running": 2,
         "kv_usage": 0.25, "signal_age_s": 0.05},
    ]
    lines = render(pool, {"10.0.0.1:8200": "ok", "10.0.0.2:8200": "unreachable"}).splitlines()
    assert lines[0].split() == ["ROLE", "ADDRESS", "ENGINE", "WAITING", "RUNNING", "KV", "USE", "SIGNAL", "AGE",
                                "HEALTH"]
    assert lines[1].split() == ["decode", "10.0.0.1:8200", "engine-a", "3", "2", "25.0%", "0.05s", "ok"]
    assert lines[2].split() == ["prefill", "10.0.0.2:8200", "engine-b", "0", "1", "50.0%", "0.12s", "unreachable"]
