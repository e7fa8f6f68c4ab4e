"""Everything Celery and Redis, in four layers (docs/architecture.md):

- `tasks.queue`: the Celery app factory and its Redis transport (shared by the three below);
- `tasks.runtime`: the replica: the generate task, stream relay, lifecycle, worker entry (over the engine);
- `tasks.client`: the web's side of the queue: enqueue, event stream, failover (never the engine);
- `tasks.control`: the control plane: cluster view, scaling commands, host agent, autoscaler.

The three upper ones never import each other.
"""
