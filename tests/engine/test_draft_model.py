"""`--speculative-model`: drafts from a small model (engine/draft_model.py), on tiny random
models, stepped by hand. The target drafting for itself accepts nearly every draft; a one-layer
random draft model of the same tokenizer is mostly wrong. Either way a user sees exactly what
plain decoding gives: every row's tokens, alternatives and finish."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.kv_budget import kv_budget
from engine.outputs import EngineError, FinishReason
from engine.scheduler import SchedulerConfig
from engine.speculative import SpeculativeConfig
from tests.engine.test_speculative import TEXTS, VerifyWhenDrafted, assert_same, request, run, seen
from tests.tiny_model import EOS_AFTER, EOS_PROMPT


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def small_draft(target, layers=1, seed=1, **changes):
    """A random draft model of the target's family and vocabulary, `layers` deep."""
    from transformers import LlamaForCausalLM

    config = target.config.__class__.from_dict({**target.config.to_dict(), "num_hidden_layers": layers, **changes})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def draft(model_and_tokenizer):
    return small_draft(model_and_tokenizer[0])


def make_engine(model_and_tokenizer, draft_model=None, speculate=4, **config):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(**config), draft_model=draft_model, draft_name="draft",
                    speculative=SpeculativeConfig(tokens=speculate) if draft_model is not None else None)
    if engine.speculator is not None:
        engine.speculator.gate = VerifyWhenDrafted()
        engine.speculator.config = SpeculativeConfig(tokens=speculate, min_acceptance=0)  # never rests
    return engine


def staggered(engine, requests, joins: dict[str, int]) -> dict:
    """Each request joins at the step `joins` names (0 when unnamed); all run to their end."""
    streams, step = {}, 0
    while len(streams) < len(requests) or not all(s.wait(0) for s in streams.values()) or engine.scheduler.has_work:
        for r in requests:
            if r.request_id not in streams and joins.get(r.request_id, 0) <= step:
                streams[r.request_id] = engine.submit(r)
        engine.step()
        step += 1
    return {rid: list(stream) for rid, stream in streams.items()}


def test_the_target_as_its_own_draft_accepts_nearly_everything_and_changes_nothing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    r = request(tokenizer, "r", TEXTS[0], max_new_tokens=24, top_n=2)
    plain, plain_steps = run(make_engine(model_and_tokenizer), [r])
    engine = make_engine(model_and_tokenizer, draft_model=model)
    speculated, steps = run(engine, [r])
    assert_same(speculated, plain)
    stats = engine.stats()
    assert stats.spec_drafter == "draft"
    assert stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens > 0
    assert steps <= plain_steps // 3


@pytest.mark.parametrize("own", [False, True], ids=["small-draft", "target-as-draft"])
def test_a_batch_whose_rows_join_and_leave_mid_flight_gives_plain_decodings_tokens(model_and_tokenizer, draft, own):
    """Rows join while others decode (the draft catches each up from its prompt), leave at
    different lengths (compaction moves the survivors' draft KV with their slots), and a late
    row reuses a finished one's cached prompt prefix."""
    model, tokenizer = model_and_tokenizer
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=6 + 5 * n, top_n=1) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "again", TEXTS[0] + " and", max_new_tokens=12))
    joins = {"r1": 2, "r2": 3, "r3": 7, "again": 9}
    plain = staggered(make_engine(model_and_tokenizer), requests, joins)
    engine = make_engine(model_and_tokenizer, draft_model=model if own else draft)
    speculated = staggered(engine, requests, joins)
    assert_same(speculated, plain)
    stats = engine.stats()
    assert stats.spec_draft_tokens > 0
    if own:
        assert stats.spec_accepted_tokens >= 0.9 * stats.spec_draft_tokens
    else:
        assert stats.spec_accepted_tokens < stats.spec_draft_tokens  # a random draft is mostly wrong


@pytest.mark.parametrize("case", ["stop", "eos", "length"])
def test_a_row_ending_inside_an_accepted_draft_ends_exactly_there(model_and_tokenizer, case):
    model, tokenizer = model_and_tokenizer
    if case == "eos":
        r = request(tokenizer, "r", EOS_PROMPT, max_new_tokens=20, ignore_eos=False)
    elif case == "length":
        r = request(tokenizer, "r", TEXTS[0], max_new_tokens=7)
    else:
        full, _ = run(make_engine(model_and_tokenizer), [request(tokenizer, "r", TEXTS[3], max_new_tokens=12)])
        texts = [e.token.text for e in full["r"]]
        at = next(i for i in range(3, 12) if texts[i].strip() and texts[i] not in "".join(texts[: i + 1])[:-1])
        r = request(tokenizer, "r", TEXTS[3], max_new_tokens=12, stop=[texts[at]])
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    engine = make_engine(model_and_tokenizer, draft_model=model)
    speculated, _ = run(engine, [r])
    assert_same(speculated, plain)
    want = {"eos": FinishReason.EOS_TOKEN, "length": FinishReason.LENGTH, "stop": FinishReason.STOP_SEQUENCE}[case]
    assert speculated["r"][-1].finish.reason is want
    assert speculated["r"][-1].finish.generated_text == plain["r"][-1].finish.generated_text
    if case == "eos":
        assert len(speculated["r"]) == EOS_AFTER
    assert speculated["r"][-1].finish.skipped_tokens > 0  # it ended inside a verify step's accepted drafts


def test_seeded_sampled_rows_give_the_same_tokens_alone_in_a_batch_and_unspeculated(model_and_tokenizer, draft):
    model, tokenizer = model_and_tokenizer
    sampled = dict(do_sample=True, temperature=0.7, top_k=40, repetition_penalty=1.2)
    requests = [request(tokenizer, f"s{n}", text, max_new_tokens=16, seed=n, **sampled) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "greedy", TEXTS[0], max_new_tokens=16))
    plain, _ = run(make_engine(model_and_tokenizer), requests)
    for draft_model in (model, draft):
        for together in (True, False):
            engine = make_engine(model_and_tokenizer, draft_model=draft_model, speculate=3)
            speculated, _ = run(engine, requests, together)
            assert_same(speculated, plain)
            assert engine.stats().spec_draft_tokens > 0


def test_grammar_rows_stay_valid_with_model_drafts(model_and_tokenizer):
    from engine.params import Grammar

    model, tokenizer = model_and_tokenizer
    grammar = Grammar("regex", "[0-9 ]{1,12}")
    r = request(tokenizer, "g", TEXTS[2], max_new_tokens=12, grammar=grammar)
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    speculated, _ = run(make_engine(model_and_tokenizer, draft_model=model), [r])
    assert [seen(e) for e in speculated.values()] == [seen(e) for e in plain.values()]
    assert all(c in "0123456789 " for c in speculated["g"][-1].finish.generated_text)


def test_a_draft_with_padded_embeddings_drafts_only_the_targets_token_ids(model_and_tokenizer):
    """Same tokenizer, more output rows (embeddings padded to a multiple, as Qwen2.5's small and
    large models are): it drafts, never one of its padding ids, and the output is plain decoding's."""
    model, tokenizer = model_and_tokenizer
    padded = small_draft(model, vocab_size=model.config.vocab_size + 8)
    padding = torch.arange(model.config.vocab_size, model.config.vocab_size + 8)
    # Its padding ids win every argmax unless they are cut off (a padding id would be out of the target's embedding).
    padded.get_output_embeddings().register_forward_hook(lambda _m, _a, out: out.index_fill(-1, padding, 1e4))
    r = request(tokenizer, "r", TEXTS[0], max_new_tokens=12)
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    engine = make_engine(model_and_tokenizer, draft_model=padded)
    assert_same(run(engine, [r])[0], plain)
    assert engine.stats().spec_draft_tokens > 0


def test_a_draft_model_of_another_tokenizer_is_refused_in_one_clear_line(model_and_tokenizer):
    from engine.draft_model import vocabulary_refusal

    model, tokenizer = model_and_tokenizer

    class Other:
        def get_vocab(self):
            return {**tokenizer.get_vocab(), "<extra>": model.config.vocab_size}

    padded = small_draft(model, vocab_size=model.config.vocab_size + 8)
    assert vocabulary_refusal(model, padded, tokenizer, tokenizer) is None
    assert vocabulary_refusal(model, padded, tokenizer, Other()) == "its tokenizer's vocabulary differs from the target's"


def test_the_draft_models_kv_shares_each_slot_in_the_budget(model_and_tokenizer, draft):
    model, _ = model_and_tokenizer
    alone = kv_budget(model, 64 << 20, slots=32, slot_length=256)
    with_draft = kv_budget(model, 64 << 20, slots=32, slot_length=256, draft_model=draft)
    assert with_draft.slot_bytes == alone.slot_bytes * 3 // 2  # 2 layers of the target, 1 of the draft
    assert "draft model logits" in with_draft.parts
    assert with_draft.slots < alone.slots


def test_a_failed_step_forgets_the_draft_kv_too(model_and_tokenizer):
    """After a failure every row fails and both caches are zeroed; the next request is exact."""
    model, tokenizer = model_and_tokenizer
    engine = make_engine(model_and_tokenizer, draft_model=model)
    run(engine, [request(tokenizer, "first", TEXTS[1], max_new_tokens=8)])
    drafter = engine.speculator.batch_drafter
    engine._fail_all(EngineError("boom"))
    assert all(not t.any() for t in drafter.runner.cache.keys)
    r = request(tokenizer, "r", TEXTS[1], max_new_tokens=10)
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    assert_same(run(engine, [r])[0], plain)


@pytest.mark.parametrize("budget", [4096, 5], ids=["one-forward", "catch-up-in-chunks"])
def test_every_proposal_is_the_draft_models_own_greedy_continuation_of_the_row(model_and_tokenizer, draft, budget):
    """Catch-up and rollback are exact: after rejections, joins and leaves, each row's drafts are
    what the draft model alone (transformers' generate) continues its tokens with; a catch-up
    longer than the prefill budget goes in chunks (memory stays bounded), still exact."""
    model, tokenizer = model_and_tokenizer
    engine = make_engine(model_and_tokenizer, draft_model=draft, max_batch_prefill_tokens=budget)
    drafter, checked = engine.speculator.batch_drafter, []
    propose = drafter.propose

    def checking(rows, counts):
        drafts = propose(rows, counts)
        for sequence, count, own in zip(rows, counts, drafts):
            if count:
                ids = torch.tensor([sequence.token_ids])
                want = draft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
                assert list(own) == want.tolist(), sequence.request_id
                checked.append(count)
        return drafts

    drafter.propose = checking
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=5 + 4 * n) for n, text in enumerate(TEXTS)]
    staggered(engine, requests, {"r2": 3, "r3": 5})
    stats = engine.stats()
    assert len(checked) > 10 and stats.spec_accepted_tokens < stats.spec_draft_tokens  # rejections happened


def test_the_bench_draft_is_the_models_first_layers_with_its_head(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from bench.truncated_draft import truncate

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cut = AutoModelForCausalLM.from_pretrained(truncate(tiny_model_dir, 1, tmp_path / "cut"))
    assert cut.config.num_hidden_layers == 1 and cut.config.vocab_size == source.config.vocab_size
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hidden = source.model.layers[0](source.model.embed_tokens(ids), position_embeddings=source.model.rotary_emb(
            source.model.embed_tokens(ids), torch.arange(3).view(1, -1)))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        want = source.lm_head(source.model.norm(hidden))
        assert torch.allclose(cut(ids).logits, want, atol=1e-5)
    with pytest.raises(ValueError, match="layers must be in 1..2"):
        truncate(tiny_model_dir, 3, tmp_path / "too-deep")


def test_the_gate_times_steady_drafting_steps_not_a_prompts_catch_up(model_and_tokenizer):
    """A row's first drafting step prefills its prompt into the draft KV: charged to every step,
    it would make drafting look many times dearer than it is, and the gate would turn it off."""
    model, tokenizer = model_and_tokenizer
    observed = []

    class Recording(VerifyWhenDrafted):
        def observe(self, rows, seconds, draft_tokens=0):
            observed.append(draft_tokens)

    engine = make_engine(model_and_tokenizer, draft_model=model)
    engine.speculator.gate = Recording()
    run(engine, [request(tokenizer, "r", TEXTS[0], max_new_tokens=16)])
    verify_steps = engine.stats().spec_drafts
    assert verify_steps >= 3
    assert len([d for d in observed if d]) == verify_steps - 1  # all but the first, the prompt's catch-up


def test_lora_rows_draft_with_the_base_draft_model_and_verify_under_their_adapter(model_and_tokenizer, tiny_model_dir,
                                                                                 tmp_path):
    import copy

    from engine.lora_files import load_adapter
    from tests.lora_adapters import build_adapter

    model, tokenizer = model_and_tokenizer
    adapter = load_adapter("head", build_adapter(tiny_model_dir, tmp_path / "head", seed=5,
                                                 targets=["q_proj", "lm_head"]), model)
    requests = [request(tokenizer, f"r{n}-{name}", text, max_new_tokens=12, adapter=name)
                for n, text in enumerate(TEXTS[:2]) for name in (None, "head")]
    base_draft = copy.deepcopy(model)  # the target's weights without its adapters: a separate model
    results = []
    for draft_model in (None, base_draft):
        engine = Engine(model, tokenizer, SchedulerConfig(), adapters=[adapter], draft_model=draft_model,
                        speculative=SpeculativeConfig(tokens=4) if draft_model is not None else None)
        if engine.speculator is not None:
            engine.speculator.gate = VerifyWhenDrafted()
        try:
            results.append(run(engine, requests))
        finally:
            engine.runner.lora.remove()
    (plain, _), (speculated, _) = results
    assert_same(speculated, plain)
    assert engine.stats().spec_accepted_tokens > 0  # the base rows' drafts are the target's own


def test_a_draft_model_off_the_slot_path_is_refused_in_one_clear_line(model_and_tokenizer):
    model, _ = model_and_tokenizer
    windowed = small_draft(model, model_type="mistral", sliding_window=16)
    windowed.config.model_type = "mistral"  # a sliding window shorter than a slot: the slot path ignores it
    with pytest.raises(EngineError, match=r"^--speculative-model draft: its sliding window \(16\) is shorter than a "
                                          r"slot .*: a draft model must take the slot path$"):
        make_engine(model_and_tokenizer, draft_model=windowed)
