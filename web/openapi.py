"""The OpenAPI document (/api-doc/openapi.json) and Swagger UI (/docs), whose JavaScript and CSS
we serve ourselves from the `swagger_ui_bundle` package (no CDN: the service may run offline)."""
from __future__ import annotations

from flask import Blueprint
from flask_smorest import Api
from swagger_ui_bundle import swagger_ui_path

import common
from web.schemas import ErrorResponseSchema

SWAGGER_UI_STATIC = "/docs/static"

CONFIG = {
    "API_TITLE": "blitzscale",
    "API_VERSION": common.__version__,
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "api-doc/openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "docs",
    "OPENAPI_SWAGGER_UI_URL": SWAGGER_UI_STATIC + "/",
}
SPEC_OPTIONS = {
    "info": {
        "description": "Text generation compatible with HuggingFace text-generation-inference, "
        "served by Celery replicas over Redis.",
        "license": {"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
    },
}


class BlitzApi(Api):
    """flask-smorest's Api, documenting TGI's ErrorResponse as the error body."""

    ERROR_SCHEMA = ErrorResponseSchema


def make_api() -> BlitzApi:
    """Unbound; `create_app` binds it with `init_app`."""
    return BlitzApi(spec_kwargs=SPEC_OPTIONS)


def swagger_ui_assets() -> Blueprint:
    return Blueprint(
        "swagger_ui_assets", __name__, static_folder=swagger_ui_path, static_url_path=SWAGGER_UI_STATIC
    )
