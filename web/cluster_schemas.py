"""Schemas of the cluster routes: BlitzScale's adjacently tagged scaling command, and the
cluster state we report."""
from __future__ import annotations

from dataclasses import dataclass

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates_schema

UP = ("TriggerNormalUp", "TriggerPrefillUp", "TriggerDecodeUp")
DOWN = ("TriggerNormalDown", "TriggerNoramalDown", "TriggerScaleDown")  # BlitzScale's own spelling too
MUTATION = ("TriggerMutation",)
STUB = fields.Integer(strict=True, validate=validate.Range(min=0))


class UpDataSchema(Schema):
    old_stub_indices = fields.List(STUB, required=True, metadata={"description": "live replicas a new one may copy from"})
    new_stub_indices = fields.List(STUB, required=True, validate=validate.Length(min=1),
                                   metadata={"description": "slots to bring up"})


class StubsDataSchema(Schema):
    stub_indices = fields.List(STUB, required=True, validate=validate.Length(min=1))


@dataclass(frozen=True)
class ScaleCommand:
    kind: str  # up | down | mutation
    trigger: str  # the `type` as sent
    slots: list[int]
    sources: list[int]


class ModifyClusterStateSchema(Schema):
    """`{"type": "TriggerNormalUp", "data": {"old_stub_indices": [0], "new_stub_indices": [1]}}`,
    `{"type": "TriggerNormalDown", "data": {"stub_indices": [1]}}` (also `TriggerNoramalDown`,
    `TriggerScaleDown`; `TriggerPrefillUp`/`TriggerDecodeUp` as NormalUp; `TriggerMutation`)."""

    class Meta:
        unknown = EXCLUDE

    type = fields.String(required=True, validate=validate.OneOf(UP + DOWN + MUTATION))
    data = fields.Dict(required=True, metadata={"description": "UpData for *Up triggers, StubsData otherwise"})

    @validates_schema
    def _check_data(self, body, **_):
        errors = self._data_schema(body["type"]).validate(body["data"])
        if errors:
            raise ValidationError({"data": errors})

    @post_load
    def _command(self, body, **_) -> ScaleCommand:
        data = self._data_schema(body["type"]).load(body["data"])
        kind = "up" if body["type"] in UP else "down" if body["type"] in DOWN else "mutation"
        slots = data["new_stub_indices"] if kind == "up" else data["stub_indices"]
        return ScaleCommand(kind, body["type"], slots, data.get("old_stub_indices", []))

    @staticmethod
    def _data_schema(kind: str) -> Schema:
        return UpDataSchema(unknown=EXCLUDE) if kind in UP else StubsDataSchema(unknown=EXCLUDE)


class CeleryViewSchema(Schema):
    responding = fields.Boolean(metadata={"description": "answered `celery inspect`"})
    queues = fields.List(fields.String(), metadata={"description": "`inspect active_queues`"})
    pid = fields.Integer(allow_none=True, metadata={"description": "`inspect stats`"})


class PrefixCacheSchema(Schema):
    enabled = fields.Boolean(metadata={"description": "--prefix-caching"})
    hit_tokens = fields.Integer(metadata={"description": "prompt tokens reused from the cache since the replica started"})
    miss_tokens = fields.Integer(metadata={"description": "prompt tokens prefilled since the replica started"})
    hit_rate = fields.Float(metadata={"description": "hit_tokens / (hit_tokens + miss_tokens)"})
    cached_tokens = fields.Integer(metadata={"description": "KV positions its free slots hold as cache now"})
    cached_slots = fields.Integer(metadata={"description": "free KV slots holding a cached prefix now"})


class SpeculationSchema(Schema):
    speculate = fields.Integer(metadata={"description": "--speculate: draft tokens per row per step (0: off)"})
    drafter = fields.String(metadata={"description": "what drafts: `ngram`, or --speculative-model's id"})
    drafts = fields.Integer(metadata={"description": "rows verified with drafts since the replica started"})
    draft_tokens = fields.Integer(metadata={"description": "draft tokens verified since the replica started"})
    accepted_tokens = fields.Integer(metadata={"description": "draft tokens accepted since the replica started"})
    acceptance_rate = fields.Float(metadata={"description": "accepted_tokens / draft_tokens"})


class ReplicaStateSchema(Schema):
    slot = fields.Integer(required=True)
    model = fields.String(allow_none=True, metadata={"description": "the model its replica serves (--models)"})
    state = fields.String(required=True, metadata={"description": "loading | active | draining | standby | stopped | dead"})
    target = fields.String(allow_none=True, metadata={"description": "what the slot was last told to become"})
    name = fields.String(allow_none=True, metadata={"description": "Celery worker name, replica<slot>@<host>"})
    host = fields.String(allow_none=True, metadata={"description": "the host (its agent's `--host-name`)"})
    pid = fields.Integer(allow_none=True)
    device = fields.String(allow_none=True, metadata={"description": "its place as the host's agent names it "
                                                      "(`cuda:3`, `cpu:1`)"})
    torch_device = fields.String(allow_none=True, metadata={"description": "the device the replica itself uses "
                                                            "(`cuda:0`: it sees only its GPU)"})
    running = fields.Integer()
    waiting = fields.Integer(metadata={"description": "requests queued inside the replica's engine"})
    batch_occupancy = fields.Float(metadata={"description": "running / max_batch_size"})
    weight_source = fields.String(allow_none=True, metadata={"description": "directory | host-cache | peer | "
                                                             "gguf-conversion"})
    weight_origin = fields.String(allow_none=True, metadata={"description": "where its weights came from, coarsely: "
                                                             "replica | host-cache | source (docs/host-cache.md)"})
    weight_host = fields.String(allow_none=True, metadata={"description": "the host they came from (a peer's, a "
                                                           "host cache's; its own for its host's cache or the source)"})
    weights = fields.Dict(allow_none=True, metadata={"description": "what its data plane serves: model hash, state "
                                                     "(starting | fetching | preparing | indexing | complete), "
                                                     "bytes sent to peers"})
    transfer = fields.Dict(allow_none=True, metadata={"description": "its copy from peers: state (fetching | done | "
                                                      "failed), source, bytes, total, mbps, seconds"})
    weight_seconds = fields.Float(allow_none=True)
    load_seconds = fields.Float(allow_none=True)
    start_path = fields.String(allow_none=True, metadata={
        "description": "how its host agent started its process: preboot (a pre-booted process took it) or fresh"})
    start_seconds = fields.Float(allow_none=True, metadata={"description": "its agent's start to its model loaded"})
    kv_slots = fields.Integer(allow_none=True, metadata={"description": "requests its KV cache holds at once"})
    cuda_graphs = fields.Integer(allow_none=True, metadata={"description": "decode CUDA graphs captured at start (0 on CPU)"})
    graph_capture_seconds = fields.Float(allow_none=True)
    updated_at = fields.Float(allow_none=True)
    error = fields.String(allow_none=True, metadata={"description": "why the slot is dead: its replica could not "
                                                     "load (the model or an adapter), or had no free device"})
    prefix_cache = fields.Nested(PrefixCacheSchema, allow_none=True)
    speculation = fields.Nested(SpeculationSchema, allow_none=True)
    celery = fields.Nested(CeleryViewSchema, allow_none=True)


class PlaceSchema(Schema):
    name = fields.String(metadata={"description": "`cuda:<index>` (the GPU's index on its host) or `cpu:<index>`"})
    label = fields.String(metadata={"description": "the GPU's model, or `cpu`"})
    memory_total = fields.Integer(allow_none=True, metadata={"description": "bytes (a CPU place: the host's)"})
    memory_free = fields.Integer(allow_none=True)
    slot = fields.Integer(allow_none=True, metadata={"description": "the replica slot holding it; null: free"})


class HostSchema(Schema):
    host = fields.String()
    pid = fields.Integer(metadata={"description": "the agent's process"})
    places = fields.List(fields.Nested(PlaceSchema), metadata={"description": "one replica each"})
    models = fields.List(fields.String(), metadata={"description": "model hashes (prefixes) its host cache holds"})
    model_sha = fields.String(allow_none=True, metadata={"description": "the model its replicas load"})
    weights_host = fields.String(allow_none=True, metadata={"description": "its replicas' data-plane address"})
    cache_addr = fields.String(allow_none=True, metadata={"description": "the agent's data plane over its host cache"})
    cache_shas = fields.List(fields.String(), metadata={"description": "the models (full hashes) that data plane serves"})
    cache_bytes = fields.Integer(metadata={"description": "bytes its host cache holds"})
    cache_limit = fields.Integer(metadata={"description": "--host-cache-bytes (0: no bound)"})
    prebooted = fields.Integer(metadata={"description": "pre-booted replica processes ready for its next starts "
                                                    "(--preboot)"})
    updated_at = fields.Float()


class ClusterStateSchema(Schema):
    manually_scale = fields.Boolean()
    min_replicas = fields.Integer()
    max_replicas = fields.Integer()
    down_target = fields.String()
    queue_size = fields.Integer(metadata={"description": "jobs waiting in the broker: the shared generation queue and the replicas' own queues"})
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), metadata={"description": "slots by state"})
    models = fields.Dict(keys=fields.String(), values=fields.Dict(), metadata={
        "description": "each served model (--models): its `queue_size` and its slots by state (`counts`)"})
    agents = fields.List(fields.String(), metadata={"description": "hosts whose agent can start replicas"})
    hosts = fields.List(fields.Nested(HostSchema), metadata={"description": "what each host's agent advertises"})
    placement = fields.Dict(allow_none=True, metadata={"description": "the last placement executed: `at`, `trigger`, "
                                                       "`placements` (slot, host, device, weights: host-cache | "
                                                       "peer | source, fetch_from: slots)"})
    autoscaler = fields.Dict(allow_none=True, metadata={"description": "the autoscaler's last decision; `backoff` "
                                                        "(failures, reason, retry_in_s) while replicas that cannot "
                                                        "load hold new processes back"})
    replicas = fields.List(fields.Nested(ReplicaStateSchema))
