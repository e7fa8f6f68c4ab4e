"""TGI's `watermark` on the default model, end to end: 200 tokens sampled at temperature 0.7 with
it score far above chance under the detector (bench.watermark), without it near zero."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from bench.watermark import detect
from common import model_files
from common.settings import Settings, default_model_id

PROMPTS = ["Once upon a time, in a small village by the sea,", "The best way to learn a new language is"]


def test_watermarked_text_is_detected_and_plain_text_is_not(real_service):
    def generate(prompt: str, watermark: bool, seed: int) -> str:
        return requests.post(f"{real_service.base_url}/generate", timeout=600, json={"inputs": prompt, "parameters": {
            "max_new_tokens": 200, "temperature": 0.7, "seed": seed, "watermark": watermark}}).json()["generated_text"]

    runs = [(prompt, watermark, seed) for watermark in (True, False) for seed, prompt in enumerate(PROMPTS, 1)]
    with ThreadPoolExecutor(len(runs)) as pool:  # one batch on the replica
        texts = list(pool.map(lambda run: generate(*run), runs))
    model_dir = model_files.prepared_dir(Settings(model_id=default_model_id()))
    scores = {(watermark, seed): detect(text, model_dir) for (_, watermark, seed), text in zip(runs, texts)}
    assert all(score.z > 4 for (watermark, _), score in scores.items() if watermark), scores
    assert all(score.z < 2 for (watermark, _), score in scores.items() if not watermark), scores
    assert all(score.scored > 100 for score in scores.values()), scores  # long texts, not a lucky few tokens
