"""Read a server-sent-events response the way a client does: raw lines off the socket."""
from __future__ import annotations

import json


def sse_events(response) -> list[dict]:
    """Every `data:` event of a streaming response, decoded; comments (keep-alives) skipped."""
    events = []
    for line in response.iter_lines():  # bytes: SSE is UTF-8 whatever the content-type says
        if line.startswith(b"data:"):
            events.append(json.loads(line[len(b"data:"):].decode("utf-8")))
    return events
