"""One sanity answer from the default model (SmolLM2-135M-Instruct) through its own chat
template and the official `openai` client."""
from __future__ import annotations

import openai


def test_chat_answers_the_capital_of_france(real_service):
    client = openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", timeout=300, max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == "smollm2"
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
