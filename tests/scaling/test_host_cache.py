"""The host cache (tasks/weights/host_cache.py) and the agent's data plane over it
(tasks/weights/cache_plane.py), on real files, real locks, real processes and real HTTP: the
least recently used entry goes first; an entry a live replica maps (even one that then dies
holding it), one being written, or one a transfer is reading is never evicted; a partial entry is
neither served nor evicted; the data plane refuses a request without the cluster's secret and a
corrupt entry never becomes a copy."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from blitzscale.redis_server import EmbeddedRedis
from common import model_files
from common.fleet import AgentRecord
from common.keys import agent_key
from common.settings import Settings
from tasks.weights import cache_plane as cache_plane_module
from tasks.weights.cache_plane import CachePlane
from tasks.weights.fetch import ChunkFetcher, NoSource, Source, SourceGone, fetch_manifest
from tasks.weights.host_cache import HostCache, Pin, entry_lock, entry_sha, keep_copy, pin_path
from tasks.weights.manifest import build_manifest

CHUNK = 4096
SECRET = "cache-s3cret"
MB = 1 << 20


def sha_of(index: int) -> str:
    return f"{index:02d}" * 32


def add_entry(root: Path, index: int, size: int, used_at: float | None = None) -> Path:
    """A complete entry of `size` bytes, its full hash in its identity file, last used at `used_at`."""
    source = root / f"source-{index}"
    source.mkdir(parents=True)
    (source / "config.json").write_text('{"n": %d}' % index)
    (source / "model.safetensors").write_bytes(os.urandom(size))
    entry = root / "cache" / "models" / sha_of(index)[:24]
    assert keep_copy(source, entry, sha_of(index), CHUNK, "xxh3_128")
    if used_at is not None:
        os.utime(pin_path(entry), (used_at, used_at))
    return entry


def names(cache: HostCache) -> list[str]:
    return [entry.name for entry in cache.entries()]


def tree(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".")}


def test_keep_copy_makes_a_complete_entry_that_names_its_model(tmp_path):
    entry = add_entry(tmp_path, 1, 10_000)
    assert model_files.entry_complete(entry) and entry_sha(entry) == sha_of(1)
    assert tree(entry) == tree(tmp_path / "source-1")
    assert not keep_copy(tmp_path / "source-1", entry, sha_of(1), CHUNK, "xxh3_128")  # there already
    assert not list(entry.parent.glob("*.staging-*"))


def test_the_least_recently_used_entry_goes_first_and_the_bound_holds(tmp_path):
    now = time.time()
    for index, age in ((1, 300), (2, 100), (3, 200)):
        add_entry(tmp_path, index, MB, used_at=now - age)
    cache = HostCache(tmp_path / "cache", limit=2 * MB + MB // 2)
    assert cache.usage() > cache.limit
    assert cache.evict() == [sha_of(1)[:24]]
    assert names(cache) == [sha_of(3)[:24], sha_of(2)[:24]] and cache.usage() <= cache.limit
    Pin(tmp_path / "cache" / "models" / sha_of(3)[:24]).release()  # used now: 2 is the oldest
    assert cache.evict(extra=MB) == [sha_of(2)[:24]]  # room for a copy of 1 MB on its way


def test_no_bound_evicts_nothing(tmp_path):
    add_entry(tmp_path, 1, MB)
    assert HostCache(tmp_path / "cache", limit=0).evict(extra=10 * MB) == []


def test_entries_other_hosts_hold_go_before_older_ones(tmp_path):
    now = time.time()
    add_entry(tmp_path, 1, MB, used_at=now - 300)
    add_entry(tmp_path, 2, MB, used_at=now - 10)
    cache = HostCache(tmp_path / "cache", limit=MB + MB // 2)
    assert cache.evict(duplicated={sha_of(2)}) == [sha_of(2)[:24]]  # the cluster keeps 1 once, here


def test_a_pinned_entry_is_never_evicted_until_its_replica_dies(tmp_path):
    """A replica process maps entry 1 (its pin held) and is killed: the kernel drops its lock."""
    now = time.time()
    old = add_entry(tmp_path, 1, MB, used_at=now - 300)
    add_entry(tmp_path, 2, MB, used_at=now - 100)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tasks.weights.host_cache import Pin; "
        f"pin = Pin(Path({str(old)!r})); print('pinned', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == b"pinned"
        os.utime(pin_path(old), (now - 300, now - 300))
        cache = HostCache(tmp_path / "cache", limit=MB + MB // 2)
        assert cache.evict() == [sha_of(2)[:24]]  # the younger one, since the oldest is mapped
        assert cache.evict(extra=MB) == [] and cache.usage() + MB > cache.limit  # over: everything is in use
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert cache.evict(extra=MB) == [sha_of(1)[:24]] and not old.exists()


def test_an_entry_being_written_is_not_evicted_and_a_partial_one_is_not_an_entry(tmp_path):
    entry = add_entry(tmp_path, 1, MB)
    staging = entry.with_name(f"{sha_of(4)[:24]}.staging-123")  # a copy in progress: counted, never listed
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"\0" * MB)
    cache = HostCache(tmp_path / "cache", limit=MB + MB // 2)
    assert names(cache) == [entry.name]
    assert cache.usage() == sum(p.stat().st_size for p in entry.iterdir()) + MB
    with entry_lock(entry):
        assert cache.evict() == []
    assert cache.evict() == [entry.name] and staging.is_dir()


def test_a_replica_pinning_during_an_eviction_finds_no_entry(tmp_path):
    """Eviction holds the pin exclusively while it renames the entry away: a replica that pins
    meanwhile waits, then sees no entry (and fetches the model) rather than a half-deleted one."""
    entry = add_entry(tmp_path, 1, MB)
    cache = HostCache(tmp_path / "cache", limit=1)
    seen = []
    with open(pin_path(entry), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as _evict_one holds it
        replica = threading.Thread(target=lambda: (Pin(entry), seen.append(model_files.entry_complete(entry))))
        replica.start()
        time.sleep(0.2)
        assert seen == []  # waiting for the pin
        shutil.rmtree(entry)
        fcntl.flock(handle, fcntl.LOCK_UN)
    replica.join(5)
    assert seen == [False] and cache.evict() == []


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def plane(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, weight_cache_dir=str(tmp_path / "cache"), weights_secret=SECRET,
                        weights_chunk_size=CHUNK, host_cache_bytes=MB + MB // 2, weights_host="127.0.0.1")
    made = CachePlane(settings, redis.Redis.from_url(redis_url)).start()
    yield made
    made.stop()


def test_the_agent_serves_every_complete_entry_only_with_the_secret(plane, tmp_path):
    entry = add_entry(tmp_path, 1, 10 * CHUNK + 5)
    partial = entry.with_name(f"{sha_of(2)[:24]}.staging-77")
    shutil.copytree(entry, partial)
    plane.refresh()
    assert plane.served() == [sha_of(1)]
    source = Source("host-cache@b", plane.address, "b")
    with pytest.raises(SourceGone, match="401"):
        fetch_manifest(source, sha_of(1), "wrong")
    with pytest.raises(SourceGone, match="401"):
        fetch_manifest(source, sha_of(1), "")
    for path in ("manifest", "data"):  # no key at all, as a curl from anyone on the network would ask
        assert requests.get(f"{plane.address}/weights/{sha_of(1)}/{path}", timeout=5).status_code == 401
    with pytest.raises(SourceGone, match="404"):
        fetch_manifest(source, sha_of(2), SECRET)
    manifest = fetch_manifest(source, sha_of(1), SECRET)
    ChunkFetcher(manifest, tmp_path / "copy", SECRET).run(lambda failed: None if failed else source)
    assert tree(tmp_path / "copy") == tree(entry)


def test_an_entry_being_read_by_a_transfer_is_not_evicted(plane, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_plane_module, "READ_GRACE_S", 0.5)
    now = time.time()
    read = add_entry(tmp_path, 1, MB, used_at=now - 300)
    add_entry(tmp_path, 2, MB, used_at=now + 600)  # younger than 1 even once 1's reading marks it used
    plane.cache.limit = 0
    plane.refresh()  # serve both, evict nothing
    plane.cache.limit = MB + MB // 2
    source = Source("host-cache@b", plane.address, "b")
    fetch_manifest(source, sha_of(1), SECRET)  # a transfer of 1 starts
    assert plane.refresh() == [sha_of(2)[:24]]  # 1 is older, but a transfer reads it
    assert read.exists() and plane.served() == [sha_of(1)]
    time.sleep(0.6)
    plane.cache.limit = MB // 2
    assert plane.refresh() == [sha_of(1)[:24]] and plane.served() == []
    with pytest.raises(SourceGone, match="404"):
        fetch_manifest(source, sha_of(1), SECRET)


def test_a_corrupt_entry_never_becomes_a_copy(plane, tmp_path):
    entry = add_entry(tmp_path, 1, 10 * CHUNK)
    manifest = build_manifest(entry, sha_of(1), CHUNK)
    plane.refresh()
    with open(entry / "model.safetensors", "r+b") as handle:  # bit rot after the manifest was made
        handle.write(b"\xff\xff\xff\xff")
        handle.seek(6 * CHUNK)
        handle.write(b"\xff\xff\xff\xff")
        handle.seek(9 * CHUNK)
        handle.write(b"\xff\xff\xff\xff")
    source = Source("host-cache@b", plane.address, "b")
    assert fetch_manifest(source, sha_of(1), SECRET) == manifest
    with pytest.raises(NoSource):
        ChunkFetcher(manifest, tmp_path / "copy", SECRET).run(lambda failed: None if failed else source)


def test_a_replica_keeps_its_source_in_the_cache_only_within_the_bound(tmp_path):
    """A model read from its source is kept in the host cache for the next cold start, unless it
    is larger than the bound (it would be evicted at once, after a wasted copy)."""
    from tasks.runtime.peer_weights import ReplicaWeights  # noqa: PLC0415 (the replica runtime: its one case here)

    source = tmp_path / "source-9"
    source.mkdir()
    (source / "model.safetensors").write_bytes(os.urandom(MB))
    for limit, kept in ((MB // 2, False), (2 * MB, True)):
        cache_dir = tmp_path / f"cache-{limit}"
        weights = ReplicaWeights(Settings(weight_cache_dir=str(cache_dir), host_cache_bytes=limit,
                                          weights_chunk_size=CHUNK), 0, "replica0@a", None)
        weights.sha = sha_of(9)
        entry = cache_dir / "models" / sha_of(9)[:24]
        weights._keep_in_host_cache(source, entry)
        deadline = time.monotonic() + (10 if kept else 1)  # not kept: a copy would be done well within 1 s
        while not model_files.entry_complete(entry) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model_files.entry_complete(entry) == kept
        assert not kept or (entry_sha(entry) == sha_of(9) and tree(entry) == tree(source))


def test_a_copy_killed_midway_is_swept_and_does_not_hold_the_bound(tmp_path):
    """A replica copying a model into the cache is SIGKILLed: its staging directory is no copy in
    progress any more (its writer lock died with it), so the agent's pass removes it rather than
    counting it for ever and evicting a good entry to make room for it."""
    kept = add_entry(tmp_path, 1, MB)
    entry = kept.with_name(sha_of(2)[:24])
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, time; from pathlib import Path; from tasks.weights.host_cache import entry_lock; "
        f"entry = Path({str(entry)!r}); lock = entry_lock(entry); lock.__enter__(); "
        "staging = entry.with_name(f'{entry.name}.staging-{os.getpid()}'); staging.mkdir(); "
        f"(staging / 'model.safetensors').write_bytes(b'\\0' * {MB}); print('copying', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert writer.stdout.readline().strip() == b"copying"
        cache = HostCache(tmp_path / "cache", limit=MB + MB // 2)
        cache.sweep()
        assert list(kept.parent.glob("*.staging-*")) and cache.usage() > 2 * MB  # alive: a copy in progress
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    cache.sweep()
    assert cache.evict() == [] and names(cache) == [kept.name]
    assert not list(kept.parent.glob("*.staging-*")) and cache.usage() <= cache.limit


def test_a_corrupt_entry_is_found_by_its_agent_and_never_served_again(plane, tmp_path):
    """Bit rot in a cached file after its manifest was made: the agent checks what it sends, so the
    first request of a bad chunk is refused (the receiver drops it as a source at once, and takes
    the model elsewhere), and the agent's next pass removes the entry: no other host asks it again."""
    entry = add_entry(tmp_path, 1, 10 * CHUNK)
    plane.refresh()
    with open(entry / "model.safetensors", "r+b") as handle:
        handle.seek(6 * CHUNK)
        handle.write(b"\xff\xff\xff\xff")
    source = Source("host-cache@b", plane.address, "b")
    manifest = fetch_manifest(source, sha_of(1), SECRET)
    fetcher = ChunkFetcher(manifest, tmp_path / "copy", SECRET, parallel=1)
    with pytest.raises(NoSource):
        fetcher.run(lambda failed: None if failed else source)
    assert fetcher.stats.corrupt_chunks == 0 and fetcher.stats.failed_sources == ["host-cache@b"]
    plane.refresh()
    assert plane.served() == [] and not entry.exists()
    with pytest.raises(SourceGone, match="404"):
        fetch_manifest(source, sha_of(1), SECRET)


def test_a_download_is_of_the_commit_the_replica_named_even_if_its_branch_moved(tmp_path):
    """A replica names a hub model by the commit `main` points at (so peers and host caches can
    give it), and downloads only when none has it, maybe a minute later: if `main` moved on
    meanwhile, what it loads (and keeps in the cache under that commit's name) must still be that
    commit's files, or the cluster would serve another commit's weights under its name."""
    from tests.hub_server import StandInHub  # noqa: PLC0415 (the stand-in hub: this one case here)

    old, new = tmp_path / "old", tmp_path / "new"
    for directory in (old, new):
        directory.mkdir()
        (directory / "config.json").write_text('{"model_type": "llama"}')
        (directory / "model.safetensors").write_bytes(os.urandom(4096))
    first, second = "1" * 40, "2" * 40
    with StandInHub({"blitz-test/moving": old}, commit=first) as hub:
        starter = subprocess.Popen([sys.executable, "-c", (
            "from common import model_files; from common.settings import Settings; "
            "from tasks.runtime.replica import download_weights; "
            f"settings = Settings(model_id='blitz-test/moving', weight_cache_dir={str(tmp_path / 'cache')!r}); "
            "source = model_files.resolve_for_start(settings); print(source.sha, flush=True); input(); "
            "print(download_weights(settings, source).directory, flush=True)")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={
                **os.environ, "PYTHONPATH": os.getcwd(), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"})
        try:
            assert starter.stdout.readline().strip() == first
            hub.repos["blitz-test/moving"], hub.history, hub.commit = new, {first: old}, second  # main moves on
            starter.stdin.write("\n")
            starter.stdin.flush()
            loaded = Path(starter.stdout.readline().strip())
        finally:
            starter.kill()
            starter.wait(10)
    assert loaded.name == first and tree(loaded) == tree(old)


def test_two_hosts_over_their_bounds_never_both_drop_a_model(redis_url, tmp_path):
    """Hosts a and b both cache model 1 and are over their bounds at once: b drops it first because
    a holds it too, and a, for which it is the least recently used, must not drop it as well in
    the same moment (each deciding by the other's record, the cluster would lose its last copy)."""
    redis.Redis.from_url(redis_url).flushall()
    planes, now = {}, time.time()
    for host in ("a", "b"):
        root = tmp_path / host
        add_entry(root, 1, MB, used_at=now - (300 if host == "a" else 200))  # the older on both
        add_entry(root, 2, MB, used_at=now - 100)
        planes[host] = CachePlane(Settings(redis_url=redis_url, weight_cache_dir=str(root / "cache"),
                                           weights_secret=SECRET, weights_chunk_size=CHUNK,
                                           host_cache_bytes=MB + MB // 2, weights_host="127.0.0.1", host_name=host),
                                  redis.Redis.from_url(redis_url)).start()
    try:
        for plane in planes.values():  # both serve 1 and 2, as their records will say
            plane.cache.limit, limit = 0, plane.cache.limit
            plane.refresh()
            plane.cache.limit = limit
        evicted = {"a": planes["a"].refresh(duplicated=set()),  # a is named first: nothing counts as shared
                   "b": planes["b"].refresh(duplicated={sha_of(1), sha_of(2)})}  # from a's record, not yet updated
        assert any(sha_of(1) in plane.served() for plane in planes.values()), evicted
        assert any(sha_of(2) in plane.served() for plane in planes.values()), evicted
    finally:
        for plane in planes.values():
            plane.stop()
        redis.Redis.from_url(redis_url).flushall()  # the claims: other tests evict these models


def test_a_stale_record_of_an_evicted_entry_costs_a_start_one_refused_request(redis_url, tmp_path):
    """Host b's record still names model 1, which b just evicted; host c serves it. A cold start on
    host a asks b, is refused at once (404), and copies the model from c's cache: no wait, no
    download, the right bytes."""
    from tasks.runtime.peer_weights import Obtained, ReplicaWeights  # noqa: PLC0415 (the replica side: one case)

    connection = redis.Redis.from_url(redis_url)
    connection.flushall()
    planes = {}
    for host in ("b", "c"):
        add_entry(tmp_path / host, 1, 20 * CHUNK)
        planes[host] = CachePlane(Settings(redis_url=redis_url, weight_cache_dir=str(tmp_path / host / "cache"),
                                           weights_secret=SECRET, weights_chunk_size=CHUNK, host_name=host,
                                           weights_host="127.0.0.1"), connection).start()
        planes[host].refresh()
        connection.set(agent_key(host), AgentRecord(host, cache_addr=planes[host].address,
                                                    cache_shas=tuple(planes[host].served())).to_json())
    weights = None
    try:
        planes["b"].cache.limit = 1
        assert planes["b"].refresh() == [sha_of(1)[:24]]  # evicted; its record, not yet renewed, says otherwise
        assert AgentRecord.from_json(connection.get(agent_key("b"))).serves_model(sha_of(1))
        settings = Settings(redis_url=redis_url, weight_cache_dir=str(tmp_path / "a" / "cache"), weights_secret=SECRET,
                            weights_chunk_size=CHUNK, host_name="a", weights_host="127.0.0.1", weight_peers="prefer",
                            weights_peer_wait=0)
        weights = ReplicaWeights(settings, 0, "replica0@a", connection).start()
        source = model_files.ModelSource("m", "directory", tmp_path / "no-such-source", sha_of(1))
        got = weights.obtain(source, lambda: pytest.fail("prepared from the source"))
        assert isinstance(got, Obtained) and (got.source, got.host) == ("host-cache", "c")
        assert tree(got.directory) == tree(tmp_path / "c" / "cache" / "models" / sha_of(1)[:24])
    finally:
        if weights is not None:
            weights.stop()
        for plane in planes.values():
            plane.stop()
        connection.flushall()


def test_a_cache_of_many_models_does_not_hold_a_descriptor_per_file(redis_url, tmp_path):
    """The agent serves every entry of its cache: one open descriptor per file of every entry would
    run a host with many cached models (a serverless fleet's) out of descriptors, under the usual
    soft limit of 1024, so that it could neither serve them nor reach Redis. Here: 40 models of 8
    files under a limit of 200 descriptors; every one is served, and copied."""
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        import redis
        from common.settings import Settings
        from tasks.weights.cache_plane import CachePlane
        from tasks.weights.fetch import ChunkFetcher, Source, fetch_manifest
        from tasks.weights.host_cache import keep_copy
        root = Path({str(tmp_path)!r})
        for index in range(40):
            source = root / f"source-{{index}}"
            source.mkdir()
            for name in range(8):
                (source / f"file-{{name}}.json").write_text(str(index) * 100)
            keep_copy(source, root / "cache" / "models" / (f"{{index:02d}}" * 12), f"{{index:02d}}" * 32, 4096, "xxh3_128")
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        connection = redis.Redis.from_url({redis_url!r})
        plane = CachePlane(Settings(redis_url={redis_url!r}, weight_cache_dir=str(root / "cache"),
                                    weights_secret="s", weights_chunk_size=4096, host_name="many",
                                    weights_host="127.0.0.1"), connection).start()
        plane.refresh()
        print(len(plane.served()), connection.ping(), flush=True)
        source = Source("host-cache@many", plane.address, "many")
        sha = "39" * 32
        ChunkFetcher(fetch_manifest(source, sha, "s"), root / "copy", "s").run(lambda failed: None if failed else source)
        print(sorted(p.name for p in (root / "copy").iterdir()) == [f"file-{{n}}.json" for n in range(8)], flush=True)
        plane.stop()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.stdout.split() == ["40", "True", "True"], done.stderr[-2000:]


@pytest.mark.parametrize("field, value", [("host_cache_bytes", -1), ("host_cache_port", -1),
                                          ("host_cache_port", 70000)])
def test_a_bad_bound_or_port_is_refused_at_start(field, value):
    """`--host-cache-bytes -1` was taken as a bound that every cache exceeds: the agent evicted
    every entry nobody mapped, each second, silently. Refused, naming the setting."""
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})
