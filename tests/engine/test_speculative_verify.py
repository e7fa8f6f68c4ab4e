"""The verify step's own parts (`--speculate`): each row's draft length, following how much of
its recent drafts was accepted, and the padded layout that CUDA graphs replay (checked here on
the CPU against the packed eager verify; graph against eager on a GPU by scripts/gpu_check.sh).
What a user sees never changes: every row's tokens equal plain decoding's."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.engine import Engine
from engine.model_runner import PaddedVerify
from engine.scheduler import ScheduledBatch, SchedulerConfig
from engine.speculative import PositionHistories, SpeculativeConfig, next_draft_length
from tests.engine.test_speculative import (TEXTS, assert_same, make_engine, model_and_tokenizer,  # noqa: F401 (fixture)
                                           plain_lora_run, request, run, with_oracle)


def test_a_row_drafts_more_after_full_acceptance_and_less_after_a_miss():
    assert next_draft_length(4, drafted=4, accepted=4, most=8) == 6  # +2 (transformers' heuristic)
    assert next_draft_length(7, drafted=7, accepted=7, most=8) == 8  # never past --speculate
    assert next_draft_length(8, drafted=8, accepted=5, most=8) == 7  # a rejection: one fewer
    assert next_draft_length(5, drafted=5, accepted=0, most=8) == 4
    assert next_draft_length(1, drafted=1, accepted=0, most=8) == 1  # never below one
    assert next_draft_length(2, drafted=1, accepted=1, most=8) == 4  # the drafter had fewer: all taken, grows


class CountRecorder:
    """Wraps a drafter, keeping the `count` each proposal was asked for."""

    def __init__(self, drafter, counts):
        self.drafter, self.counts = drafter, counts

    def propose(self, tokens, count):
        self.counts.append(count)
        return self.drafter.propose(tokens, count)


def test_draft_length_follows_the_accepted_runs_and_tokens_stay_those_of_plain_decoding(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    r = request(tokenizer, "r", TEXTS[0], max_new_tokens=40)
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=8), plain, {"r": (1,)})  # one early miss
    oracle, counts = engine.speculator.new_drafter, []
    engine.speculator.new_drafter = lambda sequence: CountRecorder(oracle(sequence), counts)
    speculated, _ = run(engine, [r])
    assert_same(speculated, plain)
    assert counts[:4] == [8, 7, 8, 8]  # the miss at output 1 costs one draft, the next full acceptance earns it back


def test_position_histories_are_each_positions_tokens_built_only_when_read(model_and_tokenizer):
    class Row:
        token_ids = [1, 2, 3]

    histories = PositionHistories([Row(), Row()], [(7, 8), ()])
    assert len(histories) == 4
    assert list(histories) == [[1, 2, 3], [1, 2, 3, 7], [1, 2, 3, 7, 8], [1, 2, 3]]
    assert histories[1:3] == [[1, 2, 3, 7], [1, 2, 3, 7, 8]] and histories[-1] == [1, 2, 3]


def batch_of(ids, positions) -> ScheduledBatch:
    return ScheduledBatch(decode=[object()] * len(ids), decode_ids=list(ids), decode_positions=list(positions))


def test_padded_layout_pads_each_row_to_the_narrowest_captured_width():
    layout = PaddedVerify.of(batch_of([10, 20, 30], [5, 9, 3]), [(11, 12), (), (31,)], [2, 3, 5], slot_length=64)
    assert layout.width == 3
    assert layout.ids == [10, 11, 12, 20, 20, 20, 30, 31, 30]  # padding repeats the row's last token
    assert layout.positions == [5, 6, 7, 9, 10, 11, 3, 4, 5]  # past each row's length: garbage by the rollback rule
    assert layout.order == [0, 1, 2, 3, 6, 7]  # padding logits are never read
    assert PaddedVerify.of(batch_of([1], [4]), [(2, 3, 4, 5)], [2, 3, 5], 64).width == 5
    assert PaddedVerify.of(batch_of([1], [4]), [(2,) * 5], [2, 3, 5], 64) is None  # wider than any graph
    assert PaddedVerify.of(batch_of([1, 2], [60, 10]), [(2,), ()], [2, 3], 62) == PaddedVerify(
        [1, 2, 2, 2], [60, 61, 10, 11], 2, [0, 1, 2])  # the last column a row may write: 61
    assert PaddedVerify.of(batch_of([1, 2], [61, 10]), [(), (3,)], [2, 3], 62) is None  # would pass the slot's end


def prefilled(model_and_tokenizer, texts):
    """An engine whose rows are prompted and decoding, and their next decode-only batch."""
    tokenizer = model_and_tokenizer[1]
    engine = make_engine(model_and_tokenizer, speculate=4, max_total_tokens=64)
    for n, text in enumerate(texts):
        engine.submit(request(tokenizer, f"r{n}", text, max_new_tokens=20))
    for _ in range(3):
        engine.step()
    batch = engine.scheduler.schedule()
    assert not batch.prefill and len(batch.decode) == len(texts)
    return engine, batch


def test_padded_verify_forward_gives_the_packed_verify_logits(model_and_tokenizer):
    """The graphs' forward (rows padded to one width, one attention call over the slots)
    scores every real position as the packed eager verify does."""
    engine, batch = prefilled(model_and_tokenizer, TEXTS[:3])
    drafts = [(5, 6, 7), (), (8,)]
    runner = engine.runner
    eager = runner.verify(batch, drafts)
    layout = PaddedVerify.of(batch, drafts, [2, 3, 5], runner.cache.slot_length)
    runner.cache.ensure_capacity(max(layout.positions) + 1)
    with torch.inference_mode():
        padded = runner.verify_forward(torch.tensor(layout.ids), torch.tensor(layout.positions), layout.width,
                                       max(layout.positions) + 1).float()
    assert padded.shape[0] == 3 * 5
    torch.testing.assert_close(padded[layout.order], eager, atol=1e-4, rtol=1e-4)


class EagerVerifyGraphs:
    """What `engine.cuda_graphs.VerifyGraphs.replay` computes, without capturing: the padded
    forward run eagerly, so the CPU checks the runner's graph path end to end."""

    def __init__(self, runner, widths):
        self.runner, self.widths, self.replays = runner, widths, 0
        self.graphs, self.capture_seconds = {}, 0.0  # none captured (what `Engine.stats` reads)

    def replay(self, layout, adapters=None):
        self.replays += 1
        length = max(layout.positions) + 1
        self.runner.cache.ensure_capacity(length)
        tokens = None if adapters is None else torch.tensor([a for a in adapters for _ in range(layout.width)])
        return self.runner.verify_forward(torch.tensor(layout.ids), torch.tensor(layout.positions), layout.width,
                                          length, tokens).float()


def test_rows_verified_through_the_padded_graph_layout_give_plain_decodings_tokens(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=16) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "s", TEXTS[2], max_new_tokens=16, do_sample=True, seed=3, top_k=20))
    plain, _ = run(make_engine(model_and_tokenizer), requests)
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), plain, {"r0": (2, 9), "r1": range(16), "s": (4,)})
    engine.runner.verify_graphs = EagerVerifyGraphs(engine.runner, [2, 3, 5])
    speculated, _ = run(engine, requests)
    assert_same(speculated, plain)
    assert engine.runner.verify_graphs.replays > 0 and engine.stats().spec_accepted_tokens > 0


def graphed(model_and_tokenizer, dtype, **options) -> Engine:
    """An engine on the GPU whose decode and verify graphs are captured (stepped by hand)."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(copy.deepcopy(model).to("cuda", dtype), tokenizer,
                    SchedulerConfig(max_total_tokens=128, max_batch_total_tokens=1024),
                    speculative=SpeculativeConfig(tokens=4), **options)
    engine.speculator.gate.drafts = lambda rows, expected, drafted: True  # every drafted step verifies
    if engine.runner.graphs is not None:
        engine.runner.graphs.capture()
        engine.runner.verify_graphs.capture(engine.runner.graphs.pool)
    return engine


def test_lora_rows_through_the_padded_graph_layout_verify_under_their_adapter(model_and_tokenizer, tiny_model_dir,
                                                                            tmp_path):
    adapter, requests, plain = plain_lora_run(model_and_tokenizer, tiny_model_dir, tmp_path)
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4, adapters=[adapter]), plain, {"r0-head": (3,)})
    engine.runner.verify_graphs = EagerVerifyGraphs(engine.runner, [2, 3, 5])
    try:
        speculated, _ = run(engine, requests)
    finally:
        engine.runner.lora.remove()
    assert_same(speculated, plain)
    assert engine.runner.verify_graphs.replays > 0 and engine.stats().spec_accepted_tokens > 0


def test_a_decode_step_without_a_captured_graph_runs_eagerly(model_and_tokenizer):
    """An engine stepped by hand before its graphs are captured (a test, a tool) decodes
    eagerly instead of failing (the graphs' bookkeeping runs anywhere; capture needs CUDA)."""
    from engine.cuda_graphs import DecodeGraphs

    engine = make_engine(model_and_tokenizer)
    assert DecodeGraphs(engine.runner).replay([1, 2], [3, 4], 5) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_graphs_replay_what_eager_verify_steps_give(model_and_tokenizer):
    """On a GPU: verify steps replayed from graphs give, token for token, what eager verify
    steps and plain decoding give, rows with and without drafts (and a sampled row) in one
    batch (scripts/gpu_check.sh)."""
    tokenizer = model_and_tokenizer[1]
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=20, top_n=2) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "s", TEXTS[2], max_new_tokens=20, do_sample=True, seed=3, top_k=20))
    model = copy.deepcopy(model_and_tokenizer[0]).to("cuda")
    plain, _ = run(Engine(model, tokenizer, SchedulerConfig(max_total_tokens=128, max_batch_total_tokens=1024),
                          cuda_graphs=False), requests)
    spoil = {"r0": (2, 9), "r2": range(20), "s": (4,)}
    tokens = {}
    for graphs in (False, True):
        engine = with_oracle(graphed(model_and_tokenizer, torch.float32, cuda_graphs=graphs), plain, spoil)
        if graphs:
            verify_graphs = engine.runner.verify_graphs
            assert verify_graphs.graphs and engine.stats().cuda_graphs > len(engine.runner.graphs.graphs)
            replayed, replay = [], verify_graphs.replay
            verify_graphs.replay = lambda *a: replayed.append(replay(*a)) or replayed[-1]
        out, _ = run(engine, requests)
        assert engine.stats().spec_accepted_tokens > 0
        tokens[graphs] = {rid: [e.token.id for e in events] for rid, events in out.items()}
    assert any(logits is not None for logits in replayed)
    assert tokens[True] == tokens[False] == {rid: [e.token.id for e in events] for rid, events in plain.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_verify_graph_scores_the_real_positions_as_the_eager_padded_forward(model_and_tokenizer, dtype):
    """One verify step, replayed (its batch and KV length padded to their buckets) and run
    eagerly: the real positions' logits agree; padding rows and columns change nothing."""
    engine = graphed(model_and_tokenizer, dtype)
    tokenizer = model_and_tokenizer[1]
    for n, text in enumerate(TEXTS[:3]):
        engine.submit(request(tokenizer, f"r{n}", text, max_new_tokens=20))
    for _ in range(3):
        engine.step()
    batch = engine.scheduler.schedule()
    runner = engine.runner
    layout = PaddedVerify.of(batch, [(5, 6, 7), (), (8,)], runner.verify_graphs.widths, runner.cache.slot_length)
    with torch.inference_mode():
        eager = runner.verify_forward(torch.tensor(layout.ids, device="cuda"),
                                      torch.tensor(layout.positions, device="cuda"), layout.width,
                                      max(layout.positions) + 1).float()[layout.order]
        graph = runner.verify_graphs.replay(layout)[layout.order]
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(graph, eager, atol=tolerance, rtol=tolerance)


def test_verify_graph_shapes_cover_each_draft_bucket_up_to_the_most_and_stay_small():
    from engine.cuda_graphs import MAX_VERIFY_GRAPH_TOKENS, verify_shapes, verify_widths

    assert verify_widths(8) == [2, 3, 5, 9] and verify_widths(4) == [2, 3, 5] and verify_widths(6) == [2, 3, 5, 7]
    assert verify_widths(1) == [2]
    shapes = verify_shapes(64, 8)
    assert all(b * w <= MAX_VERIFY_GRAPH_TOKENS for b, w in shapes)
    assert (1, 9) in shapes and (16, 9) in shapes and (32, 9) not in shapes and (64, 3) in shapes


def test_verify_graphs_take_their_outputs_out_of_the_kv_budget(model_and_tokenizer):
    from engine.cuda_graphs import length_buckets, verify_shapes
    from engine.kv_budget import kv_budget

    model = model_and_tokenizer[0]
    free, slots, length = 1 << 30, 8, 512
    plain = kv_budget(model, free, slots, length, cuda_graphs=True)
    speculated = kv_budget(model, free, slots, length, cuda_graphs=True, verify_drafts=4)
    outputs = sum(b * w for b, w in verify_shapes(slots, 4)) * len(length_buckets(length)) * model.config.vocab_size * 4
    assert speculated.parts["CUDA graph pool"] - plain.parts["CUDA graph pool"] >= outputs
    assert kv_budget(model, free, slots, length, verify_drafts=4).parts.keys() == kv_budget(model, free, slots, length).parts.keys()
