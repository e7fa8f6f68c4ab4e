"""`ChoiceText`: stop sequences cut from a choice's text, fed token by token, with the text that
might begin a stop sequence held back, so that a stream never sends what the answer then cuts."""
from __future__ import annotations

import pytest

from web.openai.choice_text import ChoiceText


def tok(text: str, special: bool = False) -> dict:
    return {"id": 1, "text": text, "logprob": -1.0, "special": special}


def stream(pieces: list[str], stops: list[str], tgi_reason: str = "stop_sequence") -> tuple[list[str], ChoiceText]:
    text = ChoiceText(stops)
    released = [text.add(tok(piece)).text for piece in pieces]
    return released + [text.finish(tgi_reason).text], text


@pytest.mark.parametrize("pieces, stops, sent", [
    ([" The", " capital", " is", " Paris", "."], ["Paris"], [" The", " capital", " is", " ", "", ""]),
    ([" is", " Pa", "ris", "."], ["Paris"], [" is", " ", "", "", ""]),  # split across tokens: " Pa" waits
    ([" a", "b", "X", "Y"], ["XY", "bZ"], [" a", "", "b", "", ""]),  # "b" might begin "bZ" until "X" comes
    ([" Pa", "ncakes"], ["Paris"], [" ", "Pancakes", ""]),  # a prefix that did not become a stop: sent
    ([" end", " Pa"], ["Paris"], [" end", " ", "Pa"]),  # held back, then sent at the end of the generation
])
def test_a_stop_is_never_sent_and_held_text_is_sent_once_it_cannot_be_one(pieces, stops, sent):
    released, text = stream(pieces, stops)
    assert released == sent
    whole = "".join(pieces)
    cut = min((whole.find(s) for s in stops if s in whole), default=len(whole))
    assert "".join(released) == whole[:cut] and text.stopped == (cut < len(whole))


def test_the_first_stop_in_the_text_wins_and_makes_the_reason_stop():
    released, text = stream(["xx", "BA", "yy"], ["AY", "B"], tgi_reason="length")
    assert "".join(released) == "xx" and text.finish_reason("length") == "stop"


def test_tokens_received_are_those_whose_text_was_sent_and_not_the_end_token():
    text = ChoiceText(["Paris"])
    received = [text.add(tok(t)) for t in [" is", " Par", "is", "!"]] + [text.finish("stop_sequence")]
    assert [r.token["text"] for step in received for r in step.tokens] == [" is", " Par"]  # " Par" began " "
    text = ChoiceText([])
    steps = [text.add(tok(" hi")), text.add(tok("")), text.add(tok(" there")), text.add(tok("</s>", special=True))]
    steps.append(text.finish("eos_token"))
    assert [[r.token["text"] for r in step.tokens] for step in steps] == [[" hi"], [], ["", " there"], [], []]
