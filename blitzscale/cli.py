"""The `blitzscale` command: serve | web | worker | prepare | download-weights | agent | autoscaler | probe.

Flags are the Settings fields with TGI launcher names (`--model-id`, `--port`,
`--max-input-tokens`, ...); each also reads its environment variable (MODEL_ID, PORT, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
import urllib.request

from blitzscale.probe import probe
from blitzscale.redis_server import EmbeddedRedis
from blitzscale.scaling import Scaling, cmd_agent, cmd_autoscaler
from blitzscale.supervisor import Supervisor
from common import hub, logs, model_files, tenants
from common.settings import Settings, flag_name
from tasks.control.devices import DEVICE_ORDER, outside_restriction, parse_devices
from tasks.control.load_backoff import replica_cannot_load
from tasks.runtime.worker import run_worker
from tasks.weights.secret import exposure

STARTS_REPLICAS = ("serve", "worker", "agent")

log = logging.getLogger("blitzscale")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind.startswith("bool"):  # `--flag`, `--flag false` (TGI's style) or `--no-flag`
            parser.add_argument(flag_name(f.name), dest=f.name, nargs="?", const=True, default=None,
                                type=_boolean, metavar="true|false")
            parser.add_argument("--no-" + flag_name(f.name)[2:], dest=f.name, action="store_false")
            continue
        parse = int if kind.startswith("int") else float if kind.startswith("float") else str
        parser.add_argument(flag_name(f.name), dest=f.name, type=parse, default=None, metavar=f.name.upper())


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
    return value in ("1", "true", "yes", "on")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings.from_env(**overrides)


def prepare(settings: Settings, tokenizer_only: bool = False):
    """Make the model loadable on this host: download a hub model into the Hugging Face cache, or
    convert a GGUF file into the host weight cache (with a progress bar) once; a model directory
    needs nothing."""
    hub.ensure_model(settings.model_id, settings.revision, weights=not tokenizer_only)
    source = model_files.resolve(settings)
    target = model_files.prepared_dir(settings, source)
    if not source.is_gguf:
        return target
    from engine.weights import prepare_gguf  # imports torch: only when there is a GGUF file to convert

    prepared = prepare_gguf(source.path, target, tokenizer_only=tokenizer_only)
    log.info("model %s ready at %s (%s, %.1f s)", settings.model_id, target, prepared.source, prepared.seconds)
    return target


def prepare_drafts(settings: Settings) -> None:
    """Each served model's `--speculative-model`, made loadable as the target is (`prepare`):
    one that is not there stops the start in one line naming the flag, instead of every replica
    failing to load it later (tasks/runtime/engine_builder.py loads it)."""
    drafts = {m.settings.speculative_model for m in settings.catalog.models if m.settings.speculative_model}
    for draft in sorted(drafts):
        try:
            prepare(settings.replace(model_id=draft, revision=None))
        except hub.ModelUnavailable as error:
            raise hub.ModelUnavailable(f"--speculative-model {draft}: {error}") from error


def gunicorn_argv(settings: Settings) -> list[str]:
    threads = settings.web_process_threads
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{settings.hostname}:{settings.port}",
        "--workers", str(settings.web_workers),
        "--worker-class", "gthread",
        "--threads", str(threads),  # one per concurrent (streaming) request
        "--timeout", "120",
        "--graceful-timeout", "10",
        "--access-logfile", "-",
        "--config", "python:web.gunicorn_conf",  # multiprocess metrics cleanup hook
        "web.wsgi:app",
    ]


def cmd_serve(settings: Settings) -> int:
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(password=secrets.token_urlsafe(32)).start()  # loopback, with a password
        settings = settings.replace(redis_url=embedded.url)
        log.info("private Redis at %s (password protected)", embedded.public_url)
    supervisor = Supervisor()
    supervisor.install_signal_handlers()
    if embedded is not None:
        supervisor.keep_running(f"private Redis at {embedded.public_url}", embedded)
    scaling = None
    try:
        prepare(settings)
        prepare_drafts(settings)
        env = {**os.environ, **settings.to_env()}
        env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="blitzscale-metrics-"))
        supervisor.spawn("web", gunicorn_argv(settings), env)
        # Replicas belong to the host agent (they come and go with scaling); the autoscaler runs
        # unless --manually-scale.
        scaling = Scaling(settings, env=env).start(settings.num_replicas)
        supervisor.stop_when(replica_cannot_load(settings, since=time.time() - 1))
        log.info("serving %s on http://%s:%d (starting: loading the replicas)", settings.model_id,
                 settings.hostname, settings.port)
        _announce_when_ready(settings)
        return supervisor.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if scaling is not None:
            scaling.stop_autoscaler()  # no scaling decisions while the service stops
        supervisor.stop_all()
        if scaling is not None:
            scaling.stop()
        if embedded is not None:
            embedded.stop()
        if supervisor.fatal:  # the last line an operator sees: why it stopped
            log.error("%s", supervisor.fatal)


def _announce_when_ready(settings: Settings) -> None:
    """One line when /health first answers 200 (a replica is active): what an operator waits for."""
    host = "127.0.0.1" if settings.hostname in ("0.0.0.0", "::") else settings.hostname
    url = f"http://{host}:{settings.port}"

    def wait() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        log.info("ready: %s (API docs at %s/docs)", url, url)
                        return
            except OSError:  # not listening yet, or 503 (HTTPError) while the replicas load
                pass
            time.sleep(0.5)

    threading.Thread(target=wait, name="announce-ready", daemon=True).start()


def cmd_web(settings: Settings) -> int:
    if not settings.redis_url:
        raise SystemExit("blitzscale web needs REDIS_URL (or --redis-url): the queue the replicas consume")
    for model in settings.catalog.models:  # every served model's tokenizer, replicas or not (docs/models.md)
        prepare(model.settings, tokenizer_only=True)
    os.environ.update(settings.to_env())
    if settings.web_workers > 1:  # request metrics of every gunicorn worker in one /metrics
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="blitzscale-metrics-"))
    argv = gunicorn_argv(settings)
    os.execv(argv[0], argv)


def cmd_download_weights(settings: Settings, model_id: str, extension: str) -> int:
    """TGI's `download-weights MODEL_ID`: the model into the local Hugging Face cache (a GGUF file
    into the host weight cache), so that later starts need no network."""
    settings = settings.replace(model_id=model_id)
    cached = hub.is_hub_id(model_id) and hub.cached_snapshot(model_id, settings.revision)
    if cached and hub.has_weights(cached):
        log.info("model %s is already in the Hugging Face cache at %s: nothing to download", model_id, cached)
        return 0
    hub.ensure_model(model_id, settings.revision, extension=extension)
    log.info("model %s ready at %s", model_id, prepare(settings))
    return 0


def cmd_worker(settings: Settings, slot: str, standby: bool = False) -> int:
    if not settings.redis_url:
        raise SystemExit("blitzscale worker needs REDIS_URL (or --redis-url)")
    run_worker(settings, None if slot == "auto" else int(slot), standby=standby)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blitzscale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("serve", "everything in one foreground command: Redis (unless REDIS_URL), replicas, web"),
        ("web", "the HTTP server alone (gunicorn)"),
        ("worker", "one replica: a Celery worker with one engine"),
        ("prepare", "download the model (hub ids) or convert it (GGUF) into this host's caches"),
        ("download-weights", "TGI's: download MODEL_ID from the Hugging Face Hub into the local cache"),
        ("agent", "this host's agent: starts replica processes when the control plane asks"),
        ("autoscaler", "the autoscaler alone: moves the active replicas between --min- and --max-replicas"),
        ("probe", "exit 0 when this host's agent, or one of its replicas, is alive in Redis (for exec probes)"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        _add_settings_flags(sub)
        if name == "worker":
            sub.add_argument("--slot", default=os.environ.get("SLOT", "0"),
                             help="replica slot (stub index), or `auto`: the lowest free one")
            sub.add_argument("--standby", action="store_true", help="load the model, consume nothing until add_consumer")
        if name == "agent":
            sub.add_argument("--replicas", type=int, default=0, help="replicas to start at once")
        if name == "download-weights":
            sub.add_argument("model", metavar="MODEL_ID", help="a Hugging Face model id (org/name)")
            sub.add_argument("--extension", default=hub.SAFETENSORS, choices=(hub.SAFETENSORS, ".bin"),
                             help="the weight files to download (default .safetensors, as TGI)")
        if name == "probe":
            sub.add_argument("role", choices=("agent", "replica"))
            sub.add_argument("--ready", action="store_true", help="replica: one has loaded its weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    logs.configure()  # from LOG_LEVEL / LOG_FORMAT until the flags are read
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except hub.ModelUnavailable as error:  # a clear line, not a traceback: nothing to debug here
        log.error("%s", error)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValueError as error:  # a malformed or out-of-range setting: one line naming it
        raise SystemExit(str(error)) from error
    logs.configure(settings.log_level, settings.log_format)
    try:
        settings.catalog  # --models and --models-file read now: a broken one is one line, not a traceback
    except (ValueError, OSError) as error:
        raise SystemExit(str(error)) from error
    if settings.devices:
        try:
            places = parse_devices(settings.devices)
        except ValueError as error:
            raise SystemExit(str(error)) from error
        if outside_restriction(places):  # never hand a replica a GPU the operator did not allow
            raise SystemExit(f"--devices names {', '.join(outside_restriction(places))}, outside "
                             "CUDA_VISIBLE_DEVICES (as nvidia-smi numbers the GPUs)")
    if args.command in STARTS_REPLICAS and exposure(settings):
        raise SystemExit(exposure(settings))  # one line, before Redis or the model is touched
    if args.command in ("serve", "web") and settings.tenants_file:
        try:
            loaded = tenants.load(settings.tenants_file, api_key=settings.api_key)  # a broken file: one line
        except tenants.TenantsError as error:
            raise SystemExit(str(error)) from error
        if settings.admin_api_key and tenants.key_digest(settings.admin_api_key) in loaded.by_digest:
            # that tenant would open the operator routes (and the data plane's derived secret)
            raise SystemExit("refusing to start: --admin-api-key is also an API key (--api-key or a key in "
                             f"--tenants-file {settings.tenants_file}); give the operator a key of its own")
    if args.command in STARTS_REPLICAS:
        os.environ.update(DEVICE_ORDER)  # CUDA numbers GPUs as nvidia-smi does (agent, replicas)
    if settings.ignored_settings():
        log.warning(settings.ignored_settings())
    if args.command == "serve":
        return cmd_serve(settings)
    if args.command == "web":
        return cmd_web(settings)
    if args.command == "worker":
        return cmd_worker(settings, args.slot, args.standby)
    if args.command == "agent":
        return cmd_agent(settings, args.replicas)
    if args.command == "autoscaler":
        return cmd_autoscaler(settings)
    if args.command == "probe":
        return probe(settings, args.role, args.ready)
    if args.command == "download-weights":
        return cmd_download_weights(settings, args.model, args.extension)
    prepare(settings)
    prepare_drafts(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
