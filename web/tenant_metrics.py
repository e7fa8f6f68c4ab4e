"""The tenant as a label on request metrics: `blitz_tenant_requests_total{tenant,status}` counts
every request a tenant's key opened (the 429s of its limits included), beside TGI's unlabelled
`tgi_request_*`. Also unbinds the tenant from the log context when the request ends."""
from __future__ import annotations

from flask import Flask, Response, g
from prometheus_client import CollectorRegistry, Counter

from common.logs import unbind_tenant


def init_app(app: Flask, registry: CollectorRegistry | None) -> None:
    requests = Counter("blitz_tenant_requests", "Requests by tenant (the API key's) and HTTP status",
                       ["tenant", "status"], registry=registry)

    @app.after_request
    def _count(response: Response) -> Response:
        tenant = g.get("tenant")
        if tenant is not None:
            requests.labels(tenant=tenant.name, status=str(response.status_code)).inc()
        return response

    @app.teardown_request
    def _unbind(_error=None):
        token = g.pop("tenant_log_token", None)
        if token is not None:
            unbind_tenant(token)
