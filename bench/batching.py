"""Continuous batching, measured side by side in one run on the default model (greedy).

    .venv/bin/python -m bench.batching            # the full run (a few minutes on 2 CPU cores)
    .venv/bin/python -m bench.batching --quick    # 8 requests x 16 tokens, to try it out
    .venv/bin/python -m bench.batching --device cuda --random-weights           # a GPU without model files
    .venv/bin/python -m bench.batching --device cuda --random-weights --architecture llama-3.2-1b \
        --requests 64 --skip service naive                                       # the 1B-class comparison

Modes: host (the engine's host time per 32-row decode step over an instant forward, and the
step's period over a simulated 3 ms device, synchronous and overlapped: `bench/host_step.py`),
ceiling (one static batch through model.generate), naive (one request at a time through
model.generate), anchor (transformers' forward over a StaticCache, one CUDA graph replayed per
step: the speed of this model code with the host out of the way; its rate counts the replays
only, prefill and capture are reported apart), engine (requests submitted to our engine,
arriving staggered over the first second on CPU, all at once on a GPU: see `--arrival-spread`),
service (concurrent streaming HTTP clients through web + Celery + Redis + one replica), and a
mixed-length run through the service.
Every mode runs in a process (group) of its own, with its inputs on the device; each mode's
result is printed and saved as it ends, and a mode that runs past `--mode-timeout` has its whole
process group stopped (TERM, then KILL) and is reported as such, so one failing mode loses
nothing else. Prints a table and the target ratios; writes bench/results/batching[-NAME].json
and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch

from bench.common import (
    Stopwatch,
    default_model_dir,
    equal_length_prompts,
    latency_summary,
    print_table,
    save,
)
from bench.graph_anchor import anchor_generate
from bench.http_load import ServeProcess, stream_requests
from bench.random_model import ARCHITECTURES, random_model, word_tokenizer, write_random_model


def run_ceiling(model, prompts, new_tokens) -> dict:
    ids = torch.tensor(prompts, device=model.device)
    with torch.inference_mode(), Stopwatch() as watch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens = (out.shape[1] - ids.shape[1]) * len(prompts)
    return {"mode": "ceiling", "requests": len(prompts), "tokens": tokens, "seconds": watch.seconds,
            "tokens_per_s": tokens / watch.seconds}


def run_naive(model, prompts, new_tokens) -> dict:
    tokens = 0
    with torch.inference_mode(), Stopwatch() as watch:
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    return {"mode": "naive", "requests": len(prompts), "tokens": tokens, "seconds": watch.seconds,
            "tokens_per_s": tokens / watch.seconds}


def run_anchor(model, prompts, new_tokens) -> dict:
    """The replays' rate: tokens decoded from the first replay on (prefill and capture apart)."""
    run = anchor_generate(model, prompts, new_tokens)
    return {"mode": "anchor", "requests": len(prompts), "tokens": run.replayed_tokens, "seconds": run.decode_seconds,
            "tokens_per_s": run.replayed_tokens / run.decode_seconds, "prefill_s": run.prefill_seconds,
            "capture_s": run.capture_seconds}


def run_engine(model, tokenizer, prompts, new_tokens, spread_s=1.0) -> dict:
    """Requests arrive staggered over `spread_s`; token times are taken by a step listener (as
    a replica's stream relay does), so client threads wake once per request, not per token."""
    from engine.engine import Engine
    from engine.params import GenerationRequest, StoppingParams
    from engine.scheduler import SchedulerConfig

    token_times: dict[str, list[float]] = {}

    def on_step(events):
        now = time.perf_counter()
        for event in events:
            token_times.setdefault(event.request_id, []).append(now)

    slots = max(32, len(prompts))
    slot_length = 1024 if len(prompts[0]) + new_tokens <= 1024 else 4096
    config = SchedulerConfig(max_batch_size=slots, max_total_tokens=slot_length, max_batch_total_tokens=slots * slot_length)
    engine = Engine(model, tokenizer, config, step_listener=on_step)
    launches = time_launches(engine)
    engine.start()
    sent_at: dict[str, float] = {}

    def client(n, prompt):
        time.sleep(spread_s * n / len(prompts))
        request = GenerationRequest(f"b{n}", tuple(prompt), stopping=StoppingParams(new_tokens, ignore_eos=True))
        sent_at[request.request_id] = time.perf_counter()
        stream = engine.submit(request)
        stream.wait()
        list(stream)

    threads = [threading.Thread(target=client, args=(n, p)) for n, p in enumerate(prompts)]
    with Stopwatch() as watch:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    engine.stop()
    ttfts = [times[0] - sent_at[rid] for rid, times in token_times.items()]
    itls = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for times in token_times.values())
    return {"mode": "engine", "requests": len(prompts), "tokens": tokens, "seconds": watch.seconds,
            "tokens_per_s": tokens / watch.seconds, **latency_summary(ttfts, itls),
            **{f"{kind}_launch_ms": 1000 * sum(times) / len(times) for kind, times in launches.items() if times}}


def time_launches(engine) -> dict[str, list[float]]:
    """The host time of each forward's launch, mixed steps (with a prompt chunk: eager) apart
    from decode steps (graph replays on a GPU): on a GPU a forward returns once its kernels are
    queued, so this is the host cost the device may wait on."""
    times: dict[str, list[float]] = {"mixed": [], "decode": []}
    forward = engine.runner.forward

    def timed(batch):
        started = time.perf_counter()
        out = forward(batch)
        times["mixed" if batch.prefill else "decode"].append(time.perf_counter() - started)
        return out

    engine.runner.forward = timed
    return times


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tokens_per_s"])


def mixed_workload(tokenizer, count, seed=0) -> list[tuple[str, int]]:
    """Prompts of 8-512 tokens and budgets of 16-256 new tokens, reproducibly drawn."""
    rng = random.Random(seed)
    words = "the a river city model token queue replica stream batch cache engine worker of and in".split()
    jobs = []
    for _ in range(count):
        target = rng.randint(8, 512)
        text = " ".join(rng.choice(words) for _ in range(target))
        ids = tokenizer(text).input_ids[:target]
        jobs.append((tokenizer.decode(ids), rng.randint(16, 256)))
    return jobs


IN_PROCESS_MODES = ("host", "ceiling", "naive", "anchor", "engine", "service")


def run_mode(args) -> dict | list[dict]:
    """One mode, in a process of its own (`--only MODE`): a fresh process keeps one
    mode's state from slowing the next (two threads that each ran torch ops get two OpenMP thread
    teams, which on 2 cores makes every op's barriers slower)."""
    if args.only == "host":
        from bench.host_step import host_rows

        return host_rows(args.random_weights)
    if args.only == "service":
        return run_service(args)
    device = torch.device(args.device)
    model, tokenizer = load(args, device)
    prompts = equal_length_prompts(tokenizer, args.requests, args.prompt_tokens)
    # Each mode warms up on its own full batch shape first (allocator, kernels; on a GPU the
    # first pass at a new shape costs several times a steady one).
    if args.only == "ceiling":
        run_ceiling(model, prompts, 8)
        return run_ceiling(model, prompts, args.new_tokens)
    if args.only == "naive":
        run_naive(model, prompts[:1], 8)
        return run_naive(model, prompts[: args.naive_requests], args.new_tokens)
    if args.only == "anchor":
        run_anchor(model, prompts, 8)
        return run_anchor(model, prompts, args.new_tokens)
    run_engine(model, tokenizer, prompts, 8, spread_s=0)
    return run_engine(model, tokenizer, prompts, args.new_tokens, spread_s=args.arrival_spread)


def load(args, device: torch.device):
    """The model and its tokenizer: the default model's files, or random weights."""
    if args.random_weights:
        model = random_model(args.architecture, device)
        return model, word_tokenizer(model.config.vocab_size)
    from transformers import AutoTokenizer

    from engine.weights import load_model

    model_dir = default_model_dir()
    return load_model(model_dir, device, None), AutoTokenizer.from_pretrained(model_dir)


def model_dir(args):
    """What `blitzscale serve` loads: the default model, or the random one written once."""
    if not args.random_weights:
        return default_model_dir()
    import tempfile
    from pathlib import Path

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return write_random_model(args.architecture, Path(tempfile.gettempdir()) / f"blitzscale-random-{args.architecture}", dtype)


def in_subprocess(args, mode: str) -> list[dict]:
    """`mode`'s rows, run in a new process group; a mode that fails or runs past
    `--mode-timeout` is one row saying so, and its whole group (a `serve` included) is stopped."""
    argv = [sys.executable, "-m", "bench.batching", "--only", mode, "--device", args.device,
            "--architecture", args.architecture] + (["--random-weights"] if args.random_weights else [])
    for name in ("requests", "new_tokens", "prompt_tokens", "naive_requests", "arrival_spread", "mixed_requests",
                 "rounds"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.prefill_tokens:
        argv += ["--prefill-tokens", str(args.prefill_tokens)]
    if "mixed" in args.skip:
        argv += ["--skip", "mixed"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=args.mode_timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        return [{"mode": mode, "error": f"timed out after {args.mode_timeout:g} s"}]
    if process.returncode != 0:
        return [{"mode": mode, "error": f"exited with {process.returncode}"}]
    result = json.loads(out.strip().splitlines()[-1])
    return result if isinstance(result, list) else [result]


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """TERM to the mode's process group (a `serve` in it stops its own children), then KILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--naive-requests", type=int, default=8,
                        help="naive mode runs this many (its tokens/s is a rate; 32 would take minutes)")
    parser.add_argument("--mixed-requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ceiling/engine/service; best kept")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--random-weights", action="store_true", help="build the architecture with random weights")
    parser.add_argument("--architecture", default="smollm2-135m", choices=sorted(ARCHITECTURES))
    parser.add_argument("--skip", nargs="*", default=[], choices=["host", "naive", "anchor", "service", "mixed"])
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="the service's --max-batch-prefill-tokens (the prefill chunk per step)")
    parser.add_argument("--arrival-spread", type=float, default=None,
                        help="seconds over which the engine mode's requests arrive (default: 1 on CPU, where a "
                             "run takes seconds; 0 on a GPU, where 1 s would outlast the whole run)")
    parser.add_argument("--name", default="", help="suffix of the results file")
    parser.add_argument("--mode-timeout", type=float, default=1800.0,
                        help="seconds one mode may run before its process group is stopped")
    parser.add_argument("--only", choices=IN_PROCESS_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens, args.naive_requests, args.mixed_requests, args.rounds = 8, 16, 2, 4, 1
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.arrival_spread is None:
        args.arrival_spread = 1.0 if args.device == "cpu" else 0.0
    if args.only:
        print(json.dumps(run_mode(args)))
        return
    rows, rounds = run_all(args)
    report(args, rows, rounds)
    failed = [row["mode"] for row in rows if "error" in row] + [mode for mode, kept in rounds.items() if not kept]
    if failed:  # so that a script running the benchmark (scripts/gpu_check.sh) fails too
        sys.exit(f"bench.batching: modes failed: {', '.join(failed)}")


def run_all(args) -> tuple[list[dict], dict]:
    """Every mode; the ones that vary most alternate over rounds and keep their best. Each
    mode's rows are printed and saved as soon as it ends."""
    print(f"{args.architecture}{' (random weights)' if args.random_weights else ''} on {args.device}, "
          f"{args.requests} requests x {args.new_tokens} tokens, {args.rounds} rounds", flush=True)
    rows, rounds = [], {"ceiling": [], "engine": []}

    def run(mode: str) -> list[dict]:
        new = in_subprocess(args, mode)
        for row in new:
            print("  " + json.dumps(row), flush=True)
        rows.extend(new)
        save(results_name(args), {"args": vars(args), "complete": False, "rows": rows, "rounds": rounds})
        return new

    if "host" not in args.skip:
        run("host")
    for _ in range(args.rounds):
        for mode in ("ceiling", "engine"):
            rounds[mode] += [r for r in in_subprocess(args, mode) if "error" not in r] or []
            print(f"  {mode} round: " + (json.dumps(rounds[mode][-1]) if rounds[mode] else "failed"), flush=True)
    rows += [best(rounds[mode]) for mode in ("ceiling", "engine") if rounds[mode]]
    for mode in ("anchor", "naive", "service"):
        if mode not in args.skip:
            run(mode)
    return rows, rounds


def results_name(args) -> str:
    return "batching" + (f"-{args.name}" if args.name else "")


def run_service(args) -> list[dict]:
    if args.random_weights:
        tokenizer = word_tokenizer(ARCHITECTURES[args.architecture]["vocab_size"])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    prompts = equal_length_prompts(tokenizer, args.requests, args.prompt_tokens)
    texts = [tokenizer.decode(p) for p in prompts]
    settings = {"model_id": model_dir(args), "max_batch_size": max(32, args.requests), "device": args.device}
    if args.prefill_tokens:
        settings["max_batch_prefill_tokens"] = args.prefill_tokens
    rows = []
    with ServeProcess(**settings) as server:
        stream_requests(server.base_url, texts, 8)  # warm-up at the measured batch shape
        runs = [{"mode": "service", **stream_requests(server.base_url, texts, args.new_tokens)}
                for _ in range(args.rounds)]
        rows.append(best(runs))
        if "mixed" not in args.skip:
            mixed = mixed_workload(tokenizer, args.mixed_requests)
            rows.append({"mode": "service-mixed",
                         **stream_requests(server.base_url, [t for t, _ in mixed], [n for _, n in mixed])})
    return rows


def report(args, rows: list[dict], rounds: dict) -> None:
    by_mode = {r["mode"]: r for r in rows}
    for row in rows:
        if row["mode"] in ("ceiling", "engine") and "seconds" in row:
            row["ms_per_step"] = 1000 * row["seconds"] / args.new_tokens
        elif row["mode"] == "anchor" and "seconds" in row:
            row["ms_per_step"] = 1000 * row["seconds"] / max(1, args.new_tokens - 1)  # replays only
    rate = {mode: row["tokens_per_s"] for mode, row in by_mode.items() if "tokens_per_s" in row}
    on_gpu = args.device != "cpu"
    ratios, targets = {}, {}
    for name, (top, bottom, target) in {
        "engine/ceiling": ("engine", "ceiling", 3.0 if on_gpu else 0.95),
        "engine/anchor": ("engine", "anchor", 1.0 if on_gpu else None),  # the GPU stretch target
        "service/engine": ("service", "engine", 0.8),
        "service/ceiling": ("service", "ceiling", 0.9),
        "service/naive": ("service", "naive", 8.0),
    }.items():
        if top in rate and bottom in rate:
            ratios[name], targets[name] = rate[top] / rate[bottom], target
    print_table(rows, ["mode", "requests", "tokens", "seconds", "tokens_per_s", "ms_per_step", "sampling_ms",
                       "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "prefill_s", "capture_s", "error"])
    for name, value in ratios.items():
        target = targets[name]
        verdict = "no target here"
        if target is not None:
            verdict = f"target >= {target}: " + ("meets" if value >= target else "MISSES")
        print(f"{name:16s} {value:6.2f}  ({verdict})")
    from bench.host_step import verdicts

    for line in verdicts([r for r in rows if "ms_per_step" in r and r["mode"].startswith(("host-", "device-"))]):
        print(line)
    if "service-mixed" in by_mode and "itl_p99_s" in by_mode["service-mixed"]:
        p99 = by_mode["service-mixed"]["itl_p99_s"]
        target = "" if on_gpu else f"  (target <= 0.5: {'meets' if p99 <= 0.5 else 'MISSES'})"
        print(f"mixed ITL p99    {p99:6.3f} s{target}")
    if on_gpu and "tokens_per_s" in by_mode.get("engine", {}):
        print_gpu_targets(args, by_mode["engine"])
    for mode, runs in rounds.items():
        print(f"{mode:8s} tokens/s per round: " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()}-core CPU"
    results = {"device": args.device, "device_name": device_name, "architecture": args.architecture,
               "random_weights": args.random_weights, "args": vars(args), "rows": rows, "rounds": rounds,
               "ratios": ratios, "targets": targets}
    results["complete"] = True
    path = save(results_name(args), results)
    plot([r for r in rows if "tokens_per_s" in r], path.with_suffix(".png"))
    print(f"results: {path} and {path.with_suffix('.png')}")


def print_gpu_targets(args, engine: dict) -> None:
    """The absolute GPU targets for the default architecture: 5,000 tok/s at 32 x 64, 4 ms per
    token at batch 1 (engine >= 1.0 x the anchor and >= 3 x generate are ratios, above)."""
    if args.architecture != "smollm2-135m":
        return
    if args.requests == 32 and args.new_tokens == 64:
        rate = engine["tokens_per_s"]
        print(f"engine tok/s     {rate:8.0f}  (target >= 5000: {'meets' if rate >= 5000 else 'MISSES'})")
    if args.requests == 1:
        ms = 1000 * engine["itl_p50_s"]
        print(f"batch-1 ms/token {ms:8.2f}  (ITL p50; target <= 4: {'meets' if ms <= 4 else 'MISSES'})")


def plot(rows: list[dict], path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (bash scripts/install.sh --bench): no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar([r["mode"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
    left.set_ylabel("generated tokens / s")
    left.set_title("Throughput")
    latency_rows = [r for r in rows if "ttft_p50_s" in r]
    labels = [r["mode"] for r in latency_rows]
    x = range(len(labels))
    for offset, key in [(-0.3, "ttft_p50_s"), (-0.1, "ttft_p99_s"), (0.1, "itl_p50_s"), (0.3, "itl_p99_s")]:
        right.bar([i + offset for i in x], [r[key] for r in latency_rows], width=0.2, label=key)
    right.set_xticks(list(x), labels)
    right.set_ylabel("seconds")
    right.set_yscale("log")
    right.set_title("Latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
