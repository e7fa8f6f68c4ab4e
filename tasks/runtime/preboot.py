"""A pre-booted replica process: `python -m tasks.runtime.preboot --ready-fd N`, started by a host
agent (tasks/control/preboot_pool.py) before any replica needs it.

It does the part of a replica's start that does not depend on the replica: importing torch,
transformers, Celery, kombu's Redis transport, the engine and the replica runtime (most of a
fresh process's boot; docs/scaling.md, "Pre-booted processes"). Its agent boots it for one
place, with that place's environment (CUDA_VISIBLE_DEVICES included). It loads no model, touches
no device (torch initialises CUDA lazily, and nothing here asks it to) and opens no Redis
connection. It says it is ready on the fd `--ready-fd` (one JSON line: boot seconds, and whether
CUDA was initialised, so the agent can refuse a process that would ignore its place), then waits
for one command on stdin: the replica's module and arguments, its whole environment and its log
path. It then becomes that replica: the environment replaced (the settings are read only now,
by the command's own `main`), stdout and stderr on the log, and the module run as `python -m`
would run it. EOF on stdin (its agent stopped or died) before a command, even mid-import: it
exits at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
import threading
import time
import warnings

# What a replica imports before it can load a model, by cost (python -X importtime, this machine:
# torch 1.7 s, transformers 0.8 s, sympy 0.6 s (torch's), accelerate 0.2 s, numpy 0.2 s; about 5 s
# in all on a loaded 2-core host, 0.5 s of it the CLI, Celery and Redis clients).
PRELOAD = (
    "torch",
    "transformers",
    "tasks.runtime.engine_builder",  # the engine, the weights loader
    "tasks.runtime.replica",
    "tasks.runtime.worker",
    "celery.apps.worker",
    "celery.worker.consumer",
    "celery.concurrency.thread",
    "kombu.transport.redis",
)


def boot() -> dict:
    # An import that asks torch whether CUDA is there gets NVML's answer, which starts no CUDA
    # driver (cudaGetDeviceCount would, and fix the devices before the place's are known).
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    started = time.perf_counter()
    for name in PRELOAD:
        importlib.import_module(name)
    torch = sys.modules["torch"]
    return {"pid": os.getpid(), "boot_seconds": round(time.perf_counter() - started, 3),
            "cuda_initialized": bool(torch.cuda.is_initialized()) or _cuda_driver_loaded(),
            "modules": len(sys.modules)}


def _cuda_driver_loaded() -> bool:
    """The CUDA driver library mapped: something started CUDA below torch's own bookkeeping."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libcuda.so" in line for line in maps)
    except OSError:  # no /proc: torch's own answer only
        return False


def become(command: dict) -> None:
    """Become the replica `command` describes, as if started fresh with its argv and env."""
    booted_with = dict(os.environ)
    os.environ.clear()
    os.environ.update(command["env"])
    _apply_thread_counts(booted_with)
    sys.stdout.flush()
    sys.stderr.flush()
    if command.get("log"):
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)  # the command pipe is done with: stdin as a daemon's
    os.dup2(null, 0)
    os.close(null)
    module = command["module"]
    sys.argv = [module, *command["args"]]  # run_module puts the module's path in argv[0]
    with warnings.catch_warnings():
        # a module this process preloaded runs again as __main__, as `python -m` would run it
        warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*found in sys.modules")
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _apply_thread_counts(booted_with: dict) -> None:
    """OpenMP read OMP_NUM_THREADS when torch loaded it, at boot: the replica's own value wins.
    (The agent boots its processes with its replicas' environment, so this is for a changed one.)"""
    wanted = os.environ.get("OMP_NUM_THREADS")
    if wanted and wanted != booted_with.get("OMP_NUM_THREADS") and wanted.isdigit() and int(wanted) > 0:
        sys.modules["torch"].set_num_threads(int(wanted))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    commands: list[bytes] = []
    reader = threading.Thread(target=_read_command, args=(commands,), name="preboot-command", daemon=True)
    reader.start()  # while importing: the agent may be gone before the imports end
    try:
        report = boot()
        with os.fdopen(args.ready_fd, "w") as ready:
            ready.write(json.dumps(report) + "\n")
        reader.join()  # the replica it becomes runs no thread of ours
    except (KeyboardInterrupt, BrokenPipeError):  # the agent's group got Ctrl-C, or the agent is gone
        return 0
    become(json.loads(commands[0]))
    return 0


def _read_command(commands: list[bytes]) -> None:
    """The one command; EOF before it (the agent stopped or died) ends the process at once, even
    mid-import: nobody will hand it one, and its imports would hold a core for seconds."""
    line = sys.stdin.buffer.readline()
    if not line.strip():
        os._exit(0)
    commands.append(line)


if __name__ == "__main__":
    sys.exit(main())
