"""WSGI entry point for gunicorn: `web.wsgi:app` (see web/gunicorn_conf.py for its hooks)."""
from __future__ import annotations

import logging

from common.settings import Settings
from web.app import create_app

app = create_app(Settings.from_env())

_not_ready = app.extensions["blitzscale"].tokens.warm()
if _not_ready:
    logging.getLogger(__name__).warning("tokenizer not loaded yet (will retry per request): %s", _not_ready)
