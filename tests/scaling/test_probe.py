"""`blitzscale probe`, the exit status of the Kubernetes exec probes, against a real Redis."""
from __future__ import annotations

import json

import redis

from blitzscale.cli import main
from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord
from common.keys import agent_key, replica_key


def test_agent_and_replica_probes_follow_the_records_in_redis(monkeypatch):
    with EmbeddedRedis() as server:
        connection = redis.Redis.from_url(server.url)
        monkeypatch.setenv("REDIS_URL", server.url)
        monkeypatch.setenv("HOST_NAME", "node-a")
        assert main(["probe", "agent"]) == 1 and main(["probe", "replica"]) == 1
        connection.set(agent_key("node-a"), AgentRecord("node-a").to_json())
        assert main(["probe", "agent"]) == 0

        record = {"slot": 0, "name": "replica0@node-a", "host": "node-a", "state": "loading"}
        connection.set(replica_key("replica0@node-a"), json.dumps({**record, "host": "node-b"}))
        assert main(["probe", "replica"]) == 1  # another host's replica
        connection.set(replica_key("replica0@node-a"), json.dumps(record))
        assert main(["probe", "replica"]) == 0 and main(["probe", "replica", "--ready"]) == 1  # still loading
        connection.set(replica_key("replica0@node-a"), json.dumps({**record, "state": "active"}))
        assert main(["probe", "replica", "--ready"]) == 0
    assert main(["probe", "agent"]) == 1  # Redis gone
