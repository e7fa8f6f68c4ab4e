"""The HTTP side: a Flask app (flask-smorest) that validates, enqueues and streams.
Never imports torch or the engine (DESIGN.md)."""

from web import json_body

json_body.install()  # before any blueprint is declared: their `arguments` parse bodies strictly
