"""Everything Celery and Redis, in layers (docs/architecture.md):

- `tasks.queue`: the Celery app factory and its Redis transport;
- `tasks.weights`: the weight data plane between replicas (manifest, server, fetcher, peers in Redis);
- `tasks.runtime`: the replica: the generate task, stream relay, lifecycle, worker entry (over the engine);
- `tasks.client`: the web's side of the queue: enqueue, event stream, failover (never the engine);
- `tasks.control`: the control plane: cluster view, scaling commands, host agent, autoscaler.

The last three build on the first two and never import each other.
"""
