"""Server-sent events as TGI writes them: `data: <compact JSON>\\n\\n` per event, a `:\\n\\n`
comment as keep-alive, and no `event:` lines."""
from __future__ import annotations

import json

KEEP_ALIVE = ":\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MIMETYPE = "text/event-stream"


def frame(payload: dict) -> str:
    return "data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n\n"
