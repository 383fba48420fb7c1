"""Load a causal-LM checkpoint and its tokenizer from a local folder or a hub id."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ramoe import hub

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(source: Mapping, *, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model described by ``source`` in eval mode.

    ``source`` has ``kind`` (``local`` or ``hub``), ``path`` (a folder or a hub id), ``revision``
    and ``dtype``, and optionally ``device_map`` (``model.device_map``). Without a device map the
    model is moved to ``device``. With one (e.g. ``auto``), transformers and accelerate spread
    the layers over every visible GPU, then CPU memory, and ``device`` is ignored. While the hub
    is offline a hub id loads from its folder in the local Hugging Face cache, and fails at once
    when it is not cached, instead of waiting on the network.
    """
    kind, path, dtype_name = source["kind"], source["path"], source.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model dtype {dtype_name!r} is not one of {sorted(DTYPES)}.")
    if kind == "local":
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {str(folder)!r} has no config.json. Point model.path at a Hugging Face "
                "checkpoint folder, or set model.source to 'pretrain'."
            )
        kwargs: dict = {}
    elif kind == "hub":
        revision = source.get("revision") or "main"
        kwargs = {"revision": revision}
        variable = hub.offline_variable()
        if variable is not None:
            snapshot = hub.cached_snapshot(path, revision)
            if snapshot is None:
                raise RuntimeError(
                    f"cannot load hub model {path!r}: the hub is offline ({variable} is set) and revision "
                    f"{revision!r} is not in the cache {hub.cache_folder()}. Download it there on a connected "
                    f"machine (hf download {path}), or set model.source to 'local' with model.path pointing "
                    "at its folder."
                )
            log.info("the hub is offline: loading %s (revision %s) from the cache folder %s", path, revision, snapshot)
            path, kwargs = str(snapshot), {}
    else:
        raise ValueError(f"model source kind {kind!r} is not 'local' or 'hub'.")

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    device_map = source.get("device_map")
    if device_map is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name], **kwargs)
        model.to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype_name], device_map=device_map, **kwargs)
        # transformers 5.25 sets hf_device_map only when the layers end up on more than one device.
        placement = sorted({str(place) for place in getattr(model, "hf_device_map", {"": model.device}).values()})
        log.info("device_map %r placed the model on %s", device_map, placement)
    model.eval()
    if tokenizer.pad_token is None:
        # Hub tokenizers often lack a pad token; batched left-padded generation needs one.
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s model from %s (%s, %.1fM parameters)", model.config.model_type, path, dtype_name,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tokenizer


def model_revision(source: Mapping) -> str:
    """Describe the model revision for provenance: the hub revision, or a hash of a local folder's weights and config.

    A hub revision such as ``main`` moves when the model's owners push. When the model is in the
    local cache, which ``load_model`` fills, the description adds the commit it resolves to there.
    """
    if source["kind"] == "hub":
        revision = source.get("revision") or "main"
        snapshot = hub.cached_snapshot(source["path"], revision)
        commit = "" if snapshot is None else f" (commit {snapshot.name})"
        return f"{source['path']}@{revision}{commit}"
    digest = hashlib.sha256()
    folder = Path(source["path"])
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return f"local:{folder.name}:sha256-{digest.hexdigest()[:16]}"
