"""The pieces of our vLLM KV connector; `kv_transfer.vllm_connector.DisaggConnector` is the entry point."""
