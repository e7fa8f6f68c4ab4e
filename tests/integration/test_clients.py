"""The official clients, unchanged, against the service."""
from __future__ import annotations

import asyncio

import pytest


def test_text_generation_client_generate(service, tiny_reference):
    from text_generation import Client

    client = Client(service.base_url, timeout=60)
    response = client.generate("The capital of France is", max_new_tokens=8, decoder_input_details=True, top_n_tokens=2)
    ids = [t.id for t in response.details.tokens]
    assert ids == tiny_reference("The capital of France is", 8)[: len(ids)]
    assert response.details.finish_reason.value in ("length", "eos_token")
    assert response.details.prefill[0].logprob is None
    assert len(response.details.top_tokens) == len(ids)


def test_text_generation_client_stream(service):
    from text_generation import Client

    client = Client(service.base_url, timeout=60)
    chunks = list(client.generate_stream("Hello", max_new_tokens=6))
    assert chunks[-1].details is not None and chunks[-1].details.generated_tokens == len(chunks)
    text = "".join(c.token.text for c in chunks if not c.token.special)
    assert chunks[-1].generated_text == text


def test_text_generation_client_validation_error(service):
    from text_generation import Client
    from text_generation.errors import ValidationError

    client = Client(service.base_url, timeout=60)
    with pytest.raises(ValidationError, match="must be <= 1024"):
        client.generate("Hello", max_new_tokens=5000)
    with pytest.raises(ValidationError, match="stop"):
        client.generate("Hello", max_new_tokens=5, stop_sequences=["a", "b", "c", "d", "e"])


def test_text_generation_async_client(service):
    from text_generation import AsyncClient

    async def run():
        client = AsyncClient(service.base_url, timeout=60)
        results = await asyncio.gather(*[client.generate("Hello", max_new_tokens=5, seed=s, do_sample=True) for s in range(4)])
        chunks = [c async for c in client.generate_stream("Hello", max_new_tokens=4)]
        return results, chunks

    results, chunks = asyncio.run(run())
    assert all(r.details.seed in range(4) for r in results)
    assert chunks[-1].generated_text is not None


def test_huggingface_hub_inference_client(service):
    """InferenceClient(base_url) posts to `/`, where return_full_text defaults to true (TGI's
    compat route for a text-generation model): the prompt leads the text."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=service.base_url, timeout=60)
    output = client.text_generation("Hello", max_new_tokens=5, details=True)
    generated = "".join(t.text for t in output.details.tokens if not t.special)
    assert output.details.generated_tokens == len(output.details.tokens)
    assert output.generated_text == "Hello" + generated
    assert client.text_generation("Hello", max_new_tokens=5) == output.generated_text
    assert client.text_generation("Hello", max_new_tokens=5, return_full_text=False) == generated
    streamed = list(client.text_generation("Hello", max_new_tokens=5, stream=True, details=True))
    assert streamed[-1].generated_text == output.generated_text
    assert streamed[-1].details.finish_reason == output.details.finish_reason
    tokens = list(client.text_generation("Hello", max_new_tokens=5, stream=True))
    assert "".join(tokens) == generated
