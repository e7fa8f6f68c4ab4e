"""GET /metrics: Prometheus text format (see web/metrics.py)."""
from __future__ import annotations

from flask import Response

from web.json_body import StrictBlueprint
from web.service import current_service

blp = StrictBlueprint("metrics", __name__, description="Prometheus metrics")


@blp.route("/metrics", methods=["GET"])
@blp.doc(responses={"200": {
    "description": "Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}})
def metrics():
    """Prometheus metrics scrape endpoint"""
    body, content_type = current_service().metrics.render()
    return Response(body, content_type=content_type)
