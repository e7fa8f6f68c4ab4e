"""The leaf layer: what every process shares and nothing of ours is imported by it.

Settings, logging, Redis key names, the wire protocol between the web and the replicas (the job,
its typed parameters, the stream events), model files, the replica states and process helpers.
See docs/architecture.md for the layers above it.
"""

__version__ = "0.1.0"
