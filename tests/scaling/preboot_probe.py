"""What a pre-booted process became (tests/scaling/test_preboot.py): `python -m
tests.scaling.preboot_probe OUT ARGS...` writes its pid, argv, environment and what it had
imported before it ran to OUT, and one line to stdout (the replica's log)."""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    out = sys.argv[1]
    report = {"pid": os.getpid(), "argv": sys.argv[1:], "env": dict(os.environ), "name": __name__,
              "torch_imported": "torch" in sys.modules, "celery_worker_imported": "celery.apps.worker" in sys.modules,
              "threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None}
    print(f"probe {os.getpid()} ran", flush=True)
    with open(out + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(out + ".tmp", out)
