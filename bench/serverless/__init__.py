"""BlitzScale's serverless case, measured: many models on one small fleet, scaled to zero and back,
under a bursty multi-model trace (docs/host-cache.md).

    .venv/bin/python -m bench.serverless                  # 6 tiny random models, ~3 min per policy
    .venv/bin/python -m bench.serverless --duration 60    # a shorter trace

`trace` makes the seeded trace (Zipf popularity, on/off bursts), `replay` sends it over HTTP and
samples the replicas, `report` sums each policy up and compares them, `plot` draws TTFT over time
with the replica counts, `policies` runs the three fleets. Writes bench/results/serverless.json
and bench/results/serverless.png.
"""
