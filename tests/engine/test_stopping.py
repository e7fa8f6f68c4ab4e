"""StopChecker: length, then EOS, then stop sequences found in a bounded text tail."""
from __future__ import annotations

from engine.outputs import FinishReason
from engine.params import StoppingParams
from engine.stopping import StopChecker

EOS = 0
EOS_IDS = frozenset({EOS, 99})


def checker(max_new_tokens: int = 100, stop: tuple[str, ...] = (), ignore_eos: bool = False):
    return StopChecker(StoppingParams(max_new_tokens, stop, ignore_eos), EOS_IDS)


def run(check: StopChecker, texts: list[str], token_id: int = 5) -> list:
    return [check.check(token_id, text) for text in texts]


def test_length_stops_at_exactly_max_new_tokens():
    check = checker(max_new_tokens=3)
    assert run(check, ["a", "b", "c"]) == [None, None, FinishReason.LENGTH]
    assert check.generated_tokens == 3


def test_length_comes_before_eos_and_stop_sequences():
    assert checker(max_new_tokens=1).check(EOS, "") is FinishReason.LENGTH
    assert checker(max_new_tokens=1, stop=("x",)).check(5, "x") is FinishReason.LENGTH


def test_eos_stops_unless_ignored():
    assert checker().check(EOS, "") is FinishReason.EOS_TOKEN
    assert checker().check(99, "") is FinishReason.EOS_TOKEN
    assert checker(ignore_eos=True).check(EOS, "") is None


def test_eos_comes_before_stop_sequences():
    assert checker(stop=("end",)).check(EOS, "end") is FinishReason.EOS_TOKEN


def test_stop_sequence_inside_one_token():
    assert run(checker(stop=("Paris",)), ["The capital", " is Paris."]) == [
        None,
        FinishReason.STOP_SEQUENCE,
    ]


def test_stop_sequence_in_the_middle_of_new_text():
    assert checker(stop=("\n\n",)).check(5, "a\n\nb") is FinishReason.STOP_SEQUENCE


def test_stop_sequence_spanning_several_tokens():
    texts = ["Hello ", "wo", "", "r", "ld!"]
    assert run(checker(stop=("world",)), texts)[-1] is FinishReason.STOP_SEQUENCE
    assert run(checker(stop=("\n\n",)), ["a\n", "\nb"])[-1] is FinishReason.STOP_SEQUENCE


def test_any_of_several_stop_sequences():
    check = checker(stop=("STOP", "halt"))
    assert run(check, ["keep going ", "ha", "lt"]) == [None, None, FinishReason.STOP_SEQUENCE]


def test_no_false_match_and_bounded_tail():
    check = checker(max_new_tokens=1000, stop=("abc",))
    texts = ["ab", "x", "c", "a" * 50, "b"] + ["zz"] * 100
    assert all(reason is None for reason in run(check, texts))
    assert len(check._tail) <= len("abc")
    assert check.check(5, "abc") is FinishReason.STOP_SEQUENCE


def test_empty_stop_sequence_is_ignored():
    assert run(checker(stop=("",)), ["a", "b"]) == [None, None]
