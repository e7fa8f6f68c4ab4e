"""What every KV slot holds, the prefix index over it, and the copies that keep slots in place.

A slot holds either a running request (the first `n` slots, `running[i].slot == i`) or, once
free, the tokens its last request wrote (prompt and reply, up to its KV length): the prefix
cache lives in the free slots, so caching takes no memory beyond the slots and never takes a slot
from a request. A new request takes a free slot, an empty one first, else the least recently used:
that is the one eviction rule, and an evicted slot leaves the index as it is overwritten.

The index maps chained hashes of 16-token blocks to the slots holding them (`Slot.hashes`), so
`lookup` walks a prompt's blocks and finds, in every slot at once, how many blocks it shares;
it then extends the match token by token and checks it against the slot's tokens (a hash only
finds candidates). Running slots are indexed by their prompt, usable up to what they have
written: a request arriving with the system prompt of one being prefilled waits a step, then
copies it. Every slot change goes through this table, so the index cannot drift from the slots.

A request reuses a match without a copy when the match is a whole free slot (the previous turn
of its conversation) or the slot is next to be evicted anyway; otherwise it copies the matched
columns into its own slot and the source stays as it was. Compaction swaps a leaving request's
row with the mover's instead of overwriting it, so a finished request stays cached.
See docs/engine.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence

BLOCK = 16  # tokens per hashed block: a match shorter than one block is not worth a copy


@dataclass(frozen=True)
class SlotCopy:
    """Columns [:length] of slot `source` into slot `target`, applied before the step's forward;
    `swap`: the two slots exchange those columns (what the target held lives on in the source)."""

    source: int
    target: int
    length: int
    swap: bool = False


@dataclass(eq=False)  # compared and hashed by identity: the index holds these objects
class Slot:
    index: int  # its place in the KV cache (moves with compaction)
    owner: Sequence | None = None
    tokens: tuple[int, ...] = ()  # free: the ids whose KV it holds; running: its prompt
    salt: str = ""  # the cache namespace of its tokens (the request's salt and LoRA adapter)
    hashes: list[int] = field(default_factory=list)  # chained hash of each full block of `tokens`
    used: int = 0  # when it was last written or read as cache (LRU)

    @property
    def written(self) -> int:
        """Positions of `tokens` whose KV is in the slot now."""
        return len(self.tokens) if self.owner is None else min(self.owner.kv_len, len(self.tokens))


@dataclass(frozen=True)
class PrefixMatch:
    source: Slot | None  # the slot holding the longest usable prefix
    length: int  # prompt positions to reuse (never the last one: its logits are needed)
    hashes: list[int]  # the prompt's block hashes (indexed once it runs)
    waits: bool = False  # a longer prefix is being written this step: better to copy it next step


def block_hashes(tokens: tuple[int, ...], salt: str, start: list[int] | None = None) -> list[int]:
    """Chained hashes of every full block of `tokens`, continuing `start` (those of its first blocks)."""
    hashes = list(start or ())
    previous = hashes[-1] if hashes else hash(("blitzscale-prefix", salt))
    for begin in range(len(hashes) * BLOCK, len(tokens) - BLOCK + 1, BLOCK):
        previous = hash((previous, tokens[begin : begin + BLOCK]))
        hashes.append(previous)
    return hashes


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...], start: int, stop: int) -> int:
    """Length of the common prefix of a and b, given that they agree before `start`, at most `stop`."""
    end = start
    while end < stop and a[end] == b[end]:
        end += 1
    return end


class SlotTable:
    def __init__(self, slots: int, caching: bool = True):
        self.caching = caching
        self.slots = [Slot(i) for i in range(slots)]
        self._by_hash: dict[int, set[Slot]] = {}
        self._copies: list[SlotCopy] = []
        self._clock = 0
        self.hit_tokens = 0  # prompt positions taken from the cache, since start
        self.miss_tokens = 0  # prompt positions prefilled

    # ---- reading ------------------------------------------------------------------------
    @property
    def running(self) -> list[Sequence]:
        """The requests in slot order: slot i holds running[i]."""
        return [slot.owner for slot in self.slots if slot.owner is not None]

    @property
    def in_use(self) -> int:
        return sum(1 for slot in self.slots if slot.owner is not None)

    @property
    def cached_tokens(self) -> int:
        """KV positions the free slots hold as cache."""
        return sum(len(slot.tokens) for slot in self.slots if slot.owner is None)

    @property
    def cached_slots(self) -> int:
        return sum(1 for slot in self.slots if slot.owner is None and slot.tokens)

    def can_allocate(self) -> bool:
        return self.in_use < len(self.slots)

    def lookup(self, sequence: Sequence) -> PrefixMatch:
        """The longest prefix of the request's prompt that some slot holds now."""
        request = sequence.request
        if not self.caching:
            return PrefixMatch(None, 0, [])
        prompt, salt = request.input_ids, request.cache_namespace
        hashes = block_hashes(prompt, salt)
        if request.prefill_logprobs:  # their prompt logprobs are computed, never stored: no reuse
            return PrefixMatch(None, 0, hashes)
        limit = len(prompt) - 1  # the last prompt token is always computed, for its logits
        candidates, pending = [], 0
        for slot, shared in self._sharing(hashes).items():
            if slot.salt != salt:
                continue
            matched = min(shared * BLOCK, limit)
            pending = max(pending, matched)  # what it will hold once written
            length = min(matched, slot.written)
            if length == shared * BLOCK:  # every shared block is written: extend token by token
                length = _common_prefix(prompt, slot.tokens, length, min(slot.written, limit))
            if length:
                candidates.append((length, slot.owner is None, slot.used, slot))
        # The longest, a free slot rather than a running one, the most recently used; checked
        # against the slot's tokens: a hash only finds candidates, it never decides.
        for length, _free, _used, source in sorted(candidates, key=lambda c: c[:3], reverse=True):
            if prompt[:length] == source.tokens[:length]:
                return PrefixMatch(source, length, hashes, waits=pending - length >= BLOCK)
        return PrefixMatch(None, 0, hashes, waits=pending >= BLOCK)

    def _sharing(self, hashes: list[int]) -> dict[Slot, int]:
        """Every slot sharing the prompt's first blocks -> how many. Hashes chain, so the slots
        holding block d are among those holding block d-1: a level as large as the one below it
        holds the same slots, and each slot is visited once, not once per block."""
        levels = []
        for value in hashes:
            holders = self._by_hash.get(value)
            if not holders:
                break
            levels.append(holders)
        blocks: dict[Slot, int] = {}
        deeper = 0
        for depth in range(len(levels), 0, -1):  # the deepest first: a slot's first level is its depth
            holders = levels[depth - 1]
            if len(holders) > deeper:
                deeper = len(holders)
                for slot in holders:
                    blocks.setdefault(slot, depth)
        return blocks

    # ---- acting ---------------------------------------------------------------------------
    def allocate(self, sequence: Sequence, match: PrefixMatch) -> None:
        """Give the request slot n = `in_use`, holding `match.length` positions of its prompt."""
        n = self.in_use
        source = match.source if match.length else None
        if source is not None and source.owner is None and (
                match.length == len(source.tokens) or source is self._victim(exclude=None)):
            own = source  # reused in place: the whole slot is prefix, or it goes next anyway
            self._place(own, n, keep=True)
        else:
            own = self._victim(exclude=source)
            source_was_here = source is not None and source.index == n
            self._place(own, n, keep=False)
            if source is not None and not source_was_here:  # else its columns are still in slot n
                self._copy(source.index, n, match.length)
        if source is not None:
            source.used = self._tick()
        self._set(own, tuple(sequence.request.input_ids), sequence.request.cache_namespace, match.hashes)
        own.owner = sequence
        sequence.slot = n
        sequence.kv_len = sequence.cached_len = match.length
        self.hit_tokens += match.length
        self.miss_tokens += sequence.prompt_len - match.length

    def release(self, finished: list[Sequence]) -> None:
        """Free the slots of finished requests, which keep what they wrote as cache; move the
        highest survivors into the holes (a swap: the finished request's KV lives on above)."""
        if not finished:
            return
        leaving = {id(s) for s in finished}
        n = self.in_use
        survivors = n - len(finished)
        holes = [slot for slot in self.slots[:survivors] if id(slot.owner) in leaving]
        movers = [slot for slot in self.slots[survivors:n] if id(slot.owner) not in leaving]
        for hole, mover in zip(holes, movers):
            kept = hole.owner.kv_len if self.caching else 0
            self._copy(mover.index, hole.index, max(mover.owner.kv_len, kept), swap=self.caching)
            self._exchange(hole, mover)
            mover.owner.slot = mover.index
        for slot in self.slots:
            if id(slot.owner) in leaving:
                self._keep_as_cache(slot)

    def take_copies(self) -> list[SlotCopy]:
        """The copies decided since the last forward, in order: apply them before the next one."""
        copies, self._copies = self._copies, []
        return copies

    def clear(self) -> None:
        """Forget everything (the KV cache is being zeroed after a failed step)."""
        for slot in self.slots:
            if slot.owner is not None:
                slot.owner.slot = None
            self._set(slot, (), "", [])
            slot.owner = None
        self._copies = []

    # ---- the slots and their index change together, only here ----------------------------
    def _keep_as_cache(self, slot: Slot) -> None:
        sequence, slot.owner = slot.owner, None
        sequence.slot = None
        if not self.caching:
            self._set(slot, (), "", [])
            return
        tokens = tuple(sequence.token_ids[: sequence.kv_len])  # the last token sampled was never written
        prompt_blocks = min(len(slot.hashes), len(tokens) // BLOCK)
        self._set(slot, tokens, slot.salt, block_hashes(tokens, slot.salt, slot.hashes[:prompt_blocks]))
        slot.used = self._tick()

    def _set(self, slot: Slot, tokens: tuple[int, ...], salt: str, hashes: list[int]) -> None:
        for value in slot.hashes:
            holders = self._by_hash[value]
            holders.discard(slot)
            if not holders:
                del self._by_hash[value]
        slot.tokens, slot.salt, slot.hashes = tokens, salt, hashes
        for value in hashes:
            self._by_hash.setdefault(value, set()).add(slot)

    def _victim(self, exclude: Slot | None) -> Slot:
        """The free slot to overwrite: an empty one, else the least recently used."""
        free = [slot for slot in self.slots if slot.owner is None and slot is not exclude]
        if not free:
            free = [exclude]
        return min(free, key=lambda slot: (bool(slot.tokens), slot.used))

    def _place(self, slot: Slot, n: int, keep: bool) -> None:
        """Bring `slot` to index n. `keep`: its columns are needed there (a swap with what n
        holds); else it is being overwritten, and only what n holds is copied out to it."""
        here = self.slots[n]
        if here is slot:
            return
        if keep:
            self._copy(slot.index, n, max(slot.written, here.written), swap=True)
        else:
            self._copy(n, slot.index, here.written)
        self._exchange(here, slot)

    def _exchange(self, a: Slot, b: Slot) -> None:
        """Two slots trade places (their KV was swapped or copied by the caller)."""
        self.slots[a.index], self.slots[b.index] = b, a
        a.index, b.index = b.index, a.index

    def _copy(self, source: int, target: int, length: int, swap: bool = False) -> None:
        if length:
            self._copies.append(SlotCopy(source, target, length, swap))

    def _tick(self) -> int:
        self._clock += 1
        return self._clock
