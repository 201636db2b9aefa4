"""disagg: disaggregated prefill/decode serving over vLLM, on Ray Serve or behind a gateway."""

__version__ = "0.1.0"
