"""GET /info: the model and the router's limits, in TGI's Info shape."""
from __future__ import annotations

import common
from web.json_body import StrictBlueprint
from web.schemas import InfoSchema
from web.service import current_service

blp = StrictBlueprint("info", __name__, description="Model information")


@blp.route("/info", methods=["GET"])
@blp.response(200, InfoSchema, description="Served model info")
def info():
    """Text Generation Inference endpoint info"""
    service = current_service()
    s = service.settings
    replica = service.cluster.first_active() or {}
    return {
        "model_id": s.model_id,
        "model_sha": replica.get("model_sha"),
        "model_dtype": replica.get("dtype") or s.dtype,
        "model_device_type": replica.get("device_type") or s.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": s.max_best_of,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": s.max_input_tokens,
        "max_total_tokens": s.max_total_tokens,
        "waiting_served_ratio": s.waiting_served_ratio,
        "max_batch_total_tokens": s.max_batch_total_tokens,
        "max_waiting_tokens": s.max_waiting_tokens,
        "max_batch_size": s.max_batch_size,
        "validation_workers": s.validation_workers,
        "max_client_batch_size": s.max_client_batch_size,
        "router": "blitzscale",
        "version": common.__version__,
        "sha": None,
        "docker_label": None,
        "lora_adapters": list(s.adapter_names),
    }
