"""The research harness, beside the results it writes (JSON, plots, tables): what compares our
stack with others and is no part of the `disagg` package.

    compare          `python -m benchmarks.compare`: the P/D study and the side by side with the peers
    report           compare's plots and markdown, from its JSON
    profile          py-spy sampling of a stack's processes during a run
    peers            the peers' stacks (Ray Serve LLM, vLLM's reference proxy), on `disagg.bench.stacks.Stack`
    ray_serve_llm    launcher of Ray Serve LLM's P/D app (one process, one Ray)
    reference_proxy  vLLM's reference P/D proxy
    nixl_quiet/      a sitecustomize on the peers' PYTHONPATH: NIXL's progress thread waits instead of spinning

Importable from the repository root only (`python -m benchmarks.compare`): the installed package
maps `disagg`, `deployments` and `kv_transfer`. The load drivers (`disagg bench serve|transfer|epp`)
stay in `disagg.bench`.
"""
