"""Worker-side disagg_* metrics (vLLM's own vllm:* series come from the engine)."""

from prometheus_client import Counter, Histogram

PREFILL_SECONDS = Histogram(
    "disagg_prefill_seconds", "Time a prefill worker spends on one remote prefill request",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PREFILL_ATTEMPTS = Counter("disagg_prefill_attempts_total", "Remote prefill attempts made by decode workers")
PREFILL_HANDOFFS = Counter(
    "disagg_prefill_handoffs_total", "Decode-side prefill outcomes: remote, or local after failed attempts",
    ["result"],
)
REQUESTS = Counter("disagg_worker_requests_total", "Requests served by this worker", ["role", "status"])
