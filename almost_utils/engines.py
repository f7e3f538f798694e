"""Pick the sampling backend a recipe asks for and hand back a ready engine.

Both backends share one interface, ``engine.generate(prompts, params, prefix="", desc=None)``
(see :mod:`almost_utils.sampling`), so the steps never care which one runs.
"""
from __future__ import annotations

from .config import ConfigError, RunConfig
from .models import load_model


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def load_engine(cfg: RunConfig, model_key: str, progress: bool = True):
    """An engine for ``cfg.models[model_key]`` on the backend ``cfg.sampling.backend``."""
    spec = cfg.models[model_key]
    if cfg.sampling.backend == "vllm":
        if not vllm_available():
            raise ConfigError("sampling.backend: 'vllm' selected but vllm is not installed; "
                              "pip install 'almost-utils[vllm]' (CUDA only) or set sampling.backend: transformers")
        from .vllm_engine import VLLMEngine
        return VLLMEngine(spec, cfg.sampling, seed=cfg.seed, progress=progress)
    from .sampling import TransformersEngine
    model, tok = load_model(spec, cfg.device, seed=cfg.seed)
    return TransformersEngine(model, tok, batch_size=cfg.sampling.batch_size, progress=progress)
