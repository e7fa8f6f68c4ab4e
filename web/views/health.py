"""Health checks: 200 with an empty body when Redis answers and a replica serves, else 503."""
from __future__ import annotations

from flask import Response

from web.errors import Unhealthy
from web.json_body import StrictBlueprint
from web.schemas import ErrorResponseSchema
from web.service import current_service

blp = StrictBlueprint("health", __name__, description="Health checks")


def check() -> Response:
    if not current_service().cluster.healthy():
        raise Unhealthy()
    return Response(b"", status=200, mimetype="text/plain")


def health_route(rule: str, endpoint: str, summary: str):
    @blp.route(rule, methods=["GET"], endpoint=endpoint)
    @blp.response(200, description="Healthy (empty body)")
    @blp.alt_response(503, schema=ErrorResponseSchema, description="Unhealthy")
    @blp.doc(summary=summary)
    def view():
        return check()

    view.__name__ = endpoint
    return view


health = health_route("/health", "health", "Health check")
ping = health_route("/ping", "ping", "Health check (AWS Sagemaker)")
root = health_route("/", "root", "Health check (same as /health)")
