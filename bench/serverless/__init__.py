"""BlitzScale's serverless case, measured: many models on one small fleet, scaled to zero and back,
under a bursty multi-model trace (docs/host-cache.md).

    .venv/bin/python -m bench.serverless                  # 6 tiny random models, ~3 min per policy
    .venv/bin/python -m bench.serverless --duration 60    # a shorter trace
    .venv/bin/python -m bench.serverless --policies c,b,a --tag reversed   # a repeat, the other order

`trace` makes the seeded trace (Zipf popularity, on/off bursts), `replay` sends it over HTTP and
samples the replicas, `report` sums each policy up and compares them, `plot` draws TTFT over time
with the replica counts, `policies` runs the three fleets. Cold starts are reported by where the
weights came from: `source`, `replica`, `host-cache-local` (this host's cache, mapped) and
`host-cache-remote` (another host's, copied). Writes bench/results/serverless[-TAG].json and .png.
"""
