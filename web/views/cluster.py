"""BlitzScale's scaling command (POST /modify_cluster_state, with `--manually-scale`) and the
cluster's state (GET /cluster_state), both over the control plane in `tasks.control.cluster`."""
from __future__ import annotations

import logging
from dataclasses import asdict

from flask import Response, current_app, request

from tasks.control.cluster import ClusterControl, ClusterError
from web.auth import require_admin
from web.cluster_schemas import (
    ClusterStateSchema,
    ModifyClusterStateSchema,
    ScaleCommand,
)
from web.errors import ApiError
from web.json_body import StrictBlueprint
from web.schemas import ErrorResponseSchema
from web.service import current_service

log = logging.getLogger(__name__)

blp = StrictBlueprint("cluster", __name__, description="Replica scaling (BlitzScale)")
CONTROL = "blitzscale.cluster_control"


class ScalingError(ApiError):
    status, error_type, default = 400, "scaling", "the cluster cannot do that"


class ScalingUnavailable(ApiError):
    status, error_type, default = 503, "scaling", "the cluster state is unavailable"


def cluster_control() -> ClusterControl:
    """One per app, sharing the web's Redis connection pool and Celery app."""
    control = current_app.extensions.get(CONTROL)
    if control is None:
        service = current_service()
        client = service.client
        control = ClusterControl(service.settings, getattr(client, "redis", None), getattr(client, "celery", None))
        current_app.extensions[CONTROL] = control
    return control


@blp.route("/modify_cluster_state", methods=["POST"])
@require_admin  # the admin key (web/auth.py), checked before the body is parsed
@blp.arguments(ModifyClusterStateSchema, example={"type": "TriggerNormalUp",
                                                  "data": {"old_stub_indices": [0], "new_stub_indices": [1]}})
@blp.response(200, description="Done (empty body): the slots are on their way to the new state")
@blp.alt_response(400, schema=ErrorResponseSchema, description="Cannot be done (unknown slot, already in that "
                  "state, illegal transition, manual scaling off)")
@blp.alt_response(422, schema=ErrorResponseSchema, description="The body does not parse")
@blp.alt_response(503, schema=ErrorResponseSchema, description="Redis or the replicas cannot be reached")
def modify_cluster_state(command: ScaleCommand):
    """Scale replicas up or down (BlitzScale's manual scaling command)"""
    settings = current_service().settings
    if not settings.manually_scale:
        raise ScalingError("manual scaling is off (start with --manually-scale): the autoscaler owns the replica count")
    if command.kind == "mutation":
        raise ScalingError("TriggerMutation turns a prefill replica into a decode replica; "
                           "this cluster runs no prefill/decode disaggregation")
    control = cluster_control()
    try:
        if command.kind == "up":
            control.scale_up(command.slots, command.sources)
        else:
            control.scale_down(command.slots)
    except ClusterError as error:
        raise ScalingError(str(error)) from error
    except Exception as error:  # Redis or the broker away (redis, kombu and socket errors alike)
        log.exception("scaling command %s failed", command.kind)
        raise ScalingUnavailable(f"the cluster could not be reached: {error}") from error
    return Response(b"", status=200, mimetype="text/plain")


@blp.route("/cluster_state", methods=["GET"])
@require_admin  # it names every data-plane address and model hash: before any Redis read or Celery inspect
@blp.response(200, ClusterStateSchema, description="Every slot's replica, as the replicas and Celery report it")
@blp.alt_response(503, schema=ErrorResponseSchema, description="Redis cannot be reached")
def cluster_state():
    """Replica slots: state, host, device, load, weight source; `?celery=false` skips `celery inspect`"""
    settings = current_service().settings
    control = cluster_control()
    try:
        slots = control.slots()
        hosts = control.hosts()
        celery = None
        if request.args.get("celery", "true").lower() not in ("0", "false", "no"):
            celery = control.celery_view([v["name"] for v in slots.values() if v.get("alive") and v.get("name")])
        low, high = settings.replica_range
        return {
            "manually_scale": settings.manually_scale,
            "min_replicas": low,
            "max_replicas": high,
            "down_target": settings.down_target,
            "queue_size": control.queue_size(slots),
            "counts": control.state_counts(slots),
            "models": {m.name: {"queue_size": control.queue_size(slots, m.name),
                                "counts": control.state_counts({s: v for s, v in slots.items() if v["model"] == m.name})}
                       for m in settings.catalog.models},
            "agents": [agent.host for agent in hosts],
            "hosts": [asdict(agent) for agent in hosts],
            "placement": control.placement(),
            "autoscaler": control.autoscaler_state(),
            "replicas": [_replica(view, celery) for _, view in sorted(slots.items())],
        }
    except Exception as error:  # Redis or the broker away (redis, kombu and socket errors alike)
        log.exception("cluster state unavailable")
        raise ScalingUnavailable(f"the cluster could not be reached: {error}") from error


def _replica(view: dict, celery: dict | None) -> dict:
    max_batch = view.get("max_batch_size") or 0
    out = {key: view.get(key) for key in ("slot", "model", "state", "target", "name", "host", "pid", "device",
                                          "torch_device", "weight_source", "weight_origin", "weight_host",
                                          "weight_seconds", "load_seconds", "start_path", "start_seconds",
                                          "kv_slots", "cuda_graphs",
                                          "graph_capture_seconds", "updated_at", "transfer", "prefix_cache",
                                          "speculation",
                                          "error")}
    out["weights"] = view.get("weights")  # its data plane: address, model hash, state, bytes sent
    out.update(running=view.get("running", 0), waiting=view.get("waiting", 0),
               batch_occupancy=round(view.get("running", 0) / max_batch, 4) if max_batch else 0.0)
    if celery is not None and view.get("name"):
        seen = celery.get(view["name"])
        out["celery"] = {"responding": seen is not None, "queues": (seen or {}).get("queues", []),
                         "pid": (seen or {}).get("pid")}
    return out
