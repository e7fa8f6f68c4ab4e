"""The weight data plane between replicas (docs/peer-weights.md): the manifest of a prepared model
(chunks and digests), the HTTP server a replica serves its weights with, the fetcher that pulls
them from peers, and what the cluster knows of it in Redis (plan, peers, secret, counters).
No torch, no Celery: the control plane and the web read `sources` too."""
