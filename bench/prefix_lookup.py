"""The prefix index's lookup, alone (part of `python -m bench.prefix_cache`): the slot table's
hashed blocks against scanning every slot's tokens, with every slot holding a cached prompt that
shares a long prefix with the one looked up (the worst case for the index: every slot matches)."""
from __future__ import annotations

import random
import time
from types import SimpleNamespace

from engine.params import GenerationRequest
from engine.slot_table import SlotTable


def _sequence(ids: list[int]) -> SimpleNamespace:
    """What the table reads of a request."""
    request = GenerationRequest("lookup", tuple(ids))
    return SimpleNamespace(request=request, kv_len=0, prompt_len=len(ids), token_ids=list(ids), slot=None,
                           cached_len=0)


def _scan(table: SlotTable, prompt: tuple[int, ...]) -> int:
    """The index's alternative: the longest common prefix with every slot, token by token."""
    best = 0
    for slot in table.slots:
        limit, n = min(len(slot.tokens), len(prompt) - 1), 0
        while n < limit and slot.tokens[n] == prompt[n]:
            n += 1
        best = max(best, n)
    return best


def measure_lookup(slots: int, shared: int, total: int, repeats: int = 50) -> dict:
    rng = random.Random(slots)
    system = [rng.randrange(50_000) for _ in range(shared)]
    table = SlotTable(slots)
    for _ in range(slots):  # every slot ends up holding the system prompt and its own question
        sequence = _sequence(system + [rng.randrange(50_000) for _ in range(total - shared)])
        table.allocate(sequence, table.lookup(sequence))
        sequence.kv_len = total
    table.release(table.running)
    probe = _sequence(system + [rng.randrange(50_000) for _ in range(total - shared)])
    started = time.perf_counter()
    for _ in range(repeats):
        match = table.lookup(probe)
    lookup = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(max(1, repeats // 10)):
        scanned = _scan(table, probe.request.input_ids)
    scan = (time.perf_counter() - started) / max(1, repeats // 10)
    assert match.length == scanned == shared
    return {"slots": slots, "shared_tokens": shared, "prompt_tokens": total,
            "index_lookup_us": 1e6 * lookup, "scan_us": 1e6 * scan}
