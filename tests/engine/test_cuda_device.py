"""An engine handed any `cuda:N` works there, whatever device the calling thread has current: its
loop thread and its graph capture run under the engine's device (engine/devices.py), so the
end-of-step event, the warm-up streams and the graphs are on the model's GPU (CUDA only; run by
scripts/gpu_check.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers

from engine.cuda_graphs import DecodeGraphs
from engine.devices import resolve_device
from engine.engine import Engine
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.engine.test_families import FAMILIES, PROMPTS, SMALL, IdTokenizer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def build(device: str):
    config_class, extra = FAMILIES["llama"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **extra), attn_implementation="sdpa")
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    return model.to(device, torch.float32).eval()


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(f"r{n}", tuple(PROMPTS[n % 4]),
                              SamplingParams(do_sample=True, seed=n, temperature=0.7) if n % 2 else SamplingParams(),
                              StoppingParams(16 + 4 * n, ignore_eos=True)) for n in range(5)]


def run(model, cuda_graphs: bool) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=8, max_total_tokens=512),
                    cuda_graphs=cuda_graphs).start()
    try:
        return [[e.token.id for e in engine.submit(r)] for r in requests()], engine
    finally:
        engine.stop()


def test_an_engine_on_another_gpu_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    reference, _ = run(build("cuda:0"), cuda_graphs=False)
    model = build("cuda:1")
    graphed, engine = run(model, cuda_graphs=True)
    eager, _ = run(model, cuda_graphs=False)
    assert engine.stats().cuda_graphs > 0
    assert all(out.device == torch.device("cuda:1") for out in engine.runner.graphs.outputs.values())
    assert graphed == eager == reference
    assert torch.cuda.current_device() == 0  # the caller's current device is left as it was


def test_the_loop_and_the_capture_run_under_the_engines_device(monkeypatch):
    """With one GPU every index is 0, so the device contexts themselves are recorded."""
    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(0)
    entered, current = [], []

    class RecordingDevice(torch.cuda.device):
        def __enter__(self):
            entered.append((threading.current_thread().name, self.idx))
            return super().__enter__()

    step, capture_step = Engine.step, DecodeGraphs._step
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(Engine, "step", lambda self: (current.append(("step", torch.cuda.current_device())),
                                                      step(self))[1])
    monkeypatch.setattr(DecodeGraphs, "_step", lambda self, b, n: (current.append(
        ("capture", torch.cuda.current_device())), capture_step(self, b, n))[1])
    graphed, engine = run(build(f"cuda:{last}"), cuda_graphs=True)
    assert ("engine-loop", last) in entered and (threading.current_thread().name, last) in entered
    assert {kind for kind, _ in current} == {"step", "capture"} and {index for _, index in current} == {last}
    assert engine.stats().cuda_graphs > 0 and all(len(tokens) > 0 for tokens in graphed)


def test_device_cuda_without_an_index_starts_an_engine():
    """`--device cuda` resolves to an indexed device: `torch.cuda.set_device` takes it (it raised
    on `cuda` alone) and the engine runs there."""
    device = resolve_device("cuda", 0, torch.cuda.device_count())
    torch.cuda.set_device(device)
    tokens, engine = run(build(str(device)), cuda_graphs=True)
    assert engine.stats().cuda_graphs > 0 and all(len(t) > 0 for t in tokens)
    assert all(out.device == device for out in engine.runner.graphs.outputs.values())


PINNED = """
import os, sys, torch
from engine.devices import resolve_device
from tests.engine.test_cuda_device import build, run
device = resolve_device(os.environ["DEVICE"], 0, torch.cuda.device_count(), os.environ["CUDA_VISIBLE_DEVICES"])
torch.cuda.set_device(device)
tokens, engine = run(build(str(device)), cuda_graphs=True)
outputs = list(engine.runner.graphs.outputs.values())
assert outputs and all(len(t) > 0 for t in tokens)
print(torch.cuda.device_count(), *{str(torch.cuda.get_device_properties(out.device).uuid) for out in outputs})
"""


def test_a_replica_pinned_to_a_gpu_computes_on_that_gpu():
    """As a host agent starts it: CUDA_VISIBLE_DEVICES=<last GPU>, `--device cuda:<last>` (its
    place's name). The graphs' outputs must live on that physical GPU (its UUID), not GPU 0:
    with more than one GPU, a wrong device shows here."""
    last = torch.cuda.device_count() - 1
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(last), "DEVICE": f"cuda:{last}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", PINNED], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen, *uuids = done.stdout.split()
    assert seen == "1" and uuids == [str(torch.cuda.get_device_properties(last).uuid)]
