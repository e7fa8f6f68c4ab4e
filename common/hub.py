"""Models from the Hugging Face Hub, kept in its local cache by `huggingface_hub`.

A model id that is neither a local path nor a `.gguf` file (`org/name`) is looked up in the local
Hugging Face cache first, without the network; what is missing is downloaded with
`huggingface_hub.snapshot_download` (its progress bars, resumable, safe against concurrent
downloads of the same files), by `blitzscale serve`, `prepare`, `web` (the tokenizer files only),
a replica, and `blitzscale download-weights MODEL_ID` (TGI's command). huggingface_hub reads its
own environment: `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`/`HF_HUB_CACHE`, and `HF_HUB_OFFLINE=1`,
under which nothing is downloaded and a model missing from the cache fails at once, naming it.
The revision is `--revision` (`REVISION`), as TGI's launcher names it. huggingface_hub is
imported when first needed: every web process imports this module, few of them download.

As TGI does, only `.safetensors` weights are downloaded by default, from the repository's top level
(with its config, tokenizer and chat template files); a repository with only PyTorch `.bin`
weights is refused with a message saying so, unless `.bin` is asked for.
"""
from __future__ import annotations

import json
import logging
from fnmatch import fnmatch
from pathlib import Path

log = logging.getLogger(__name__)

SAFETENSORS = ".safetensors"
# Besides the weights: config, generation config, tokenizer (fast, sentencepiece, BPE files,
# tiktoken), chat template, safetensors index.
SUPPORT_FILES = ("*.json", "*.jinja", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")
# Top-level weight files that are not the model's (TGI skips them too): training state.
_NOT_WEIGHTS = ("arguments", "args", "training", "optimizer", "scheduler")


class ModelUnavailable(FileNotFoundError):
    """The model cannot be had here: not local, not cached, and not downloadable."""


def is_hub_id(model_id: str) -> bool:
    """`org/name`, with no local file or directory of that name."""
    path = Path(model_id).expanduser()
    return (model_id.count("/") == 1 and not model_id.startswith(("/", ".", "~"))
            and not model_id.endswith(".gguf") and not path.exists())


def cached_snapshot(model_id: str, revision: str | None) -> Path | None:
    """The model's snapshot directory in the local Hugging Face cache, when it holds its config
    (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ValueError:  # not a valid repository id or revision: not a hub model
        return None
    return Path(found).parent if isinstance(found, str) else None


def has_weights(snapshot: Path) -> bool:
    """Whether a snapshot holds whole weights: every shard its index names, or weight files."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((snapshot / shard).is_file() for shard in shards)
    return any(snapshot.glob("*.safetensors")) or any(snapshot.glob("*.bin"))


def ensure_model(model_id: str, revision: str | None, *, weights: bool = True,
                 extension: str = SAFETENSORS) -> Path | None:
    """The snapshot of a hub model id, downloaded when the cache lacks it (with its weights, unless
    `weights` is false: the web needs the tokenizer only); None for a local model."""
    if not is_hub_id(model_id):
        return None
    snapshot = cached_snapshot(model_id, revision)
    if snapshot is not None and (not weights or has_weights(snapshot)):
        return snapshot
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            f"model {model_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE=1 forbids downloading it: download it where the hub is reachable "
            f"(`blitzscale download-weights {model_id}`) or unset HF_HUB_OFFLINE")
    return download(model_id, revision, weights=weights, extension=extension)


def remote_commit(model_id: str, revision: str | None) -> str:
    """The commit a hub model's revision names, asked of the hub (metadata only, no file): its
    identity before it is downloaded, the same as its snapshot directory's name after."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            f"model {model_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE=1 forbids asking the hub for it: download it where the hub is reachable "
            f"(`blitzscale download-weights {model_id}`) or unset HF_HUB_OFFLINE")
    try:
        return HfApi().model_info(model_id, revision=revision).sha
    except Exception as error:  # the hub's and the network's errors alike, whichever version: say what failed
        raise ModelUnavailable(f"could not ask {constants.ENDPOINT} for model {model_id!r} "
                               f"(revision {revision or 'main'}): {type(error).__name__}: {error}") from error


def download(model_id: str, revision: str | None = None, *, weights: bool = True,
             extension: str = SAFETENSORS) -> Path:
    """Download the files a replica (or, without `weights`, the web) needs; returns the snapshot."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = HfApi().list_repo_files(model_id, revision=revision)
        wanted = files_to_download(model_id, files, weights=weights, extension=extension)
        log.info("downloading %s (%s) from %s: %s", model_id, revision or "main", constants.ENDPOINT,
                 ", ".join(wanted))
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=wanted))
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelUnavailable(f"model {model_id!r} (revision {revision or 'main'}) is not on "
                               f"{constants.ENDPOINT}, or needs a token (HF_TOKEN): {error}") from error
    except (HfHubHTTPError, OSError) as error:
        raise ModelUnavailable(f"could not download model {model_id!r} from {constants.ENDPOINT}: {error}") from error
    except Exception as error:  # the network's own errors (httpx's), whichever version: say what failed
        raise ModelUnavailable(f"could not reach {constants.ENDPOINT} for model {model_id!r}: "
                               f"{type(error).__name__}: {error}") from error


def files_to_download(model_id: str, files: list[str], *, weights: bool, extension: str = SAFETENSORS) -> list[str]:
    """The repository's top-level files a replica needs: support files, then `extension` weights."""
    top = [f for f in files if "/" not in f]
    support = [f for f in top if any(fnmatch(f, pattern) for pattern in SUPPORT_FILES)]
    if not weights:
        return support
    chosen = [f for f in top if f.endswith(extension) and not any(word in f for word in _NOT_WEIGHTS)]
    if chosen:
        return support + chosen
    pytorch = [f for f in top if f.endswith(".bin") and not any(word in f for word in _NOT_WEIGHTS)]
    if pytorch and extension == SAFETENSORS:
        raise ModelUnavailable(
            f"model {model_id!r} has no .safetensors weights, only PyTorch .bin files ({', '.join(pytorch[:3])}): "
            "blitzscale downloads safetensors only, as TGI does. Convert them to safetensors, or download "
            f"them anyway with `blitzscale download-weights {model_id} --extension .bin`")
    raise ModelUnavailable(f"model {model_id!r} has no {extension} weights at the top of its repository")


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def ensure_adapter(adapter_id: str, revision: str | None = None) -> Path:
    """A LoRA adapter's snapshot (PEFT's two files) from the local Hugging Face cache, downloaded
    when missing, as `ensure_model` does for a model."""
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

    try:
        found = [try_to_load_from_cache(adapter_id, name, revision=revision) for name in ADAPTER_FILES]
    except ValueError:  # not a valid repository id
        found = []
    if found and all(isinstance(path, str) for path in found):
        return Path(found[0]).parent
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(
            f"LoRA adapter {adapter_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE=1 forbids downloading it: give its local directory (`name=path`) or unset HF_HUB_OFFLINE")
    try:
        return Path(snapshot_download(adapter_id, revision=revision, allow_patterns=list(ADAPTER_FILES)))
    except Exception as error:  # the hub's and the network's errors alike: say which adapter failed
        raise ModelUnavailable(f"could not download LoRA adapter {adapter_id!r} from {constants.ENDPOINT}: "
                               f"{type(error).__name__}: {error}") from error
