"""Where a speculative verify step's time goes, beside a plain decode step (batch 1, CPU).

One request of `bench.speculative`'s document prompt is decoded a few steps, then each part is
timed on its own, the parts interleaved round after round: the forward of 1 position and of
k + 1 (with the linear weights packed for oneDNN, `engine/cpu_linear.py`, and without), the output
projection alone, sampling the positions, the n-gram proposal. Timings are the thread's CPU time
on one thread (`--threads`), so other jobs on a shared machine do not count; medians and minima
of `--rounds`. docs/engine.md ("Where a verify step's time goes") reads them.

    python -m bench.verify_profile [--drafts 8] [--rounds 9]
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

from bench.common import default_model_dir, print_table, save
from bench.speculative import GROUNDED, chat


@contextmanager
def mkl_weights(model):
    """Within: the linear layers multiply by their plain weights (MKL), not the packed ones."""
    linears = [m for m in model.modules() if "forward" in m.__dict__ and getattr(m, "packed_weight", None) is not None]
    forwards = [m.__dict__.pop("forward") for m in linears]
    try:
        yield
    finally:
        for module, forward in zip(linears, forwards):
            module.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from engine.engine import Engine
    from engine.params import GenerationRequest, StoppingParams
    from engine.sampling import BatchSampler
    from engine.scheduler import SchedulerConfig
    from engine.speculative import SpeculativeConfig
    from engine.weights import load_model

    directory = default_model_dir()
    model, tokenizer = load_model(directory, torch.device("cpu"), None), AutoTokenizer.from_pretrained(directory)
    config = SchedulerConfig(max_batch_size=32, max_batch_total_tokens=32 * 1024, max_total_tokens=1024)
    engine = Engine(model, tokenizer, config, speculative=SpeculativeConfig(args.drafts, 2, 4))
    engine.speculator.gate.drafts = lambda *_: False  # plain steps up to the measured position
    engine.submit(GenerationRequest("profile", tuple(chat(tokenizer, GROUNDED["document-qa"])),
                                    stopping=StoppingParams(max_new_tokens=200)))
    for _ in range(20):
        engine.step()
    batch = engine.scheduler.schedule()
    sequence, runner, k = batch.decode[0], engine.runner, args.drafts
    drafts = [tuple(sequence.token_ids[-k:])]  # their values do not change the cost
    hidden = {1: torch.randn(1, model.config.hidden_size), k + 1: torch.randn(k + 1, model.config.hidden_size)}
    plain_logits, verify_logits = runner.forward(batch).decode_logits, runner.verify(batch, drafts)
    plain_sampler = BatchSampler([sequence.sampler], "cpu")

    def verify_sampling():
        samplers, histories = engine.speculator.verify_rows([sequence], drafts)
        BatchSampler(samplers, "cpu")(verify_logits, histories, 0)

    def unpacked(job):
        def run():
            with mkl_weights(model):
                job()
        return run

    parts = {  # part -> (plain step's, verify step's)
        "forward, MKL weights": (unpacked(lambda: runner.forward(batch)),
                                 unpacked(lambda: runner.verify(batch, drafts))),
        "output projection, MKL": (unpacked(lambda: model.lm_head(hidden[1])),
                                   unpacked(lambda: model.lm_head(hidden[k + 1]))),
        "forward, packed weights": (lambda: runner.forward(batch), lambda: runner.verify(batch, drafts)),
        "output projection, packed": (lambda: model.lm_head(hidden[1]), lambda: model.lm_head(hidden[k + 1])),
        "sampling": (lambda: plain_sampler(plain_logits, [sequence.token_ids], 0), verify_sampling),
        "n-gram proposal": (None, lambda: engine.speculator.propose([sequence])),
    }
    times = {(name, kind): [] for name in parts for kind in (0, 1)}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, jobs in parts.items():
                for kind, job in enumerate(jobs):
                    if job is not None:
                        started = time.thread_time()
                        job()
                        times[(name, kind)].append(time.thread_time() - started)
    rows = []
    for name in parts:
        plain, verify = times[(name, 0)], times[(name, 1)]
        row = {"part": name, "verify_ms": 1e3 * statistics.median(verify), "verify_min_ms": 1e3 * min(verify)}
        if plain:
            row.update(plain_ms=1e3 * statistics.median(plain), plain_min_ms=1e3 * min(plain),
                       ratio=statistics.median(verify) / statistics.median(plain))
        rows.append(row)
    print(f"batch 1, {sequence.kv_len} positions, {k} drafts, {args.threads} thread(s), thread CPU time, "
          f"{args.rounds} interleaved rounds")
    print_table(rows, ["part", "plain_ms", "plain_min_ms", "verify_ms", "verify_min_ms", "ratio"])
    print(f"saved {save('verify-profile-cpu', {'args': vars(args), 'positions': sequence.kv_len, 'rows': rows})}")


if __name__ == "__main__":
    main()
