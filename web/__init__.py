"""The HTTP side: a Flask app (flask-smorest) that validates, enqueues and streams.
Never imports torch or the engine (docs/architecture.md)."""
