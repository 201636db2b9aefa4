"""What-ifs for a deployment: the real `disagg.routing.Scheduler` in a discrete-event simulation.

    cost.py      the cost model (one engine on one machine): step time, KV blocks, transfers
    profile.py   `disagg profile`: measure a vLLM engine here and fit a cost model
    profiles/    cost models of published GPU figures, and the one measured on this machine
    trace.py     the requests replayed: our workloads, or a Mooncake-format trace
    engine.py    a simulated vLLM engine (continuous batching, chunked prefill, KV blocks, preemption)
    cluster.py   engines per role + the real scheduler + KV transfers + faults, on one simpy clock
    simulate.py  `disagg simulate`: one run, its summary, per-request results and timeline
    plan.py      `disagg plan`: search P:D counts, the P/D threshold, aggregated or not, for an SLO
    plots.py     the commands' plots
"""
