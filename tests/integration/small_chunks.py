"""The blitzscale command (`python -m tests.integration.small_chunks worker --slot 0`, ...) with
huggingface_hub writing downloads in 64 KiB chunks instead of 10 MiB, so that a cut download of
the tiny model (half a MiB) has written part of its file and must resume from there."""
from __future__ import annotations

import sys

from huggingface_hub import constants

if __name__ == "__main__":
    from blitzscale.cli import main

    constants.DOWNLOAD_CHUNK_SIZE = 64 * 1024
    sys.exit(main())
