"""The vLLM sampling backend: the same ``generate`` interface as the transformers engine.

Selected with ``sampling.backend: vllm`` (``pip install 'almost-utils[vllm]'``, CUDA only).
vLLM batches continuously and pages the KV cache, and with prefix caching on, the few-shot
prefix shared by every prompt of a configuration is computed once and reused.

Outputs match :class:`almost_utils.sampling.TransformersEngine` in format: for each prompt, in
input order, the completion text only, cut before the first stop string. Tokenization matches
too: the prefix is tokenized with special tokens (BOS), each prompt without, and the ids are
joined, so both engines see the same token ids. Random streams differ: the same seed gives the
same outputs run after run within one backend, not across backends.
"""
from __future__ import annotations

from .config import ConfigError, ModelSpec, SamplingConfig
from .models import check_source, load_tokenizer, resolve_source


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to (not including) the earliest of the stop strings."""
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def request_seed(seed: int, index: int) -> int:
    """A distinct, reproducible seed per prompt of one call (identical prompts still differ)."""
    return (seed * 1_000_003 + index) % (2 ** 63)


class VLLMEngine:
    """``vllm.LLM`` behind the project's ``generate(prompts, params, prefix, desc)`` interface."""

    def __init__(self, spec: ModelSpec, sampling_cfg: SamplingConfig, seed: int = 0, progress: bool = True):
        try:
            import vllm
        except ImportError:
            raise ConfigError("sampling.backend: 'vllm' selected but vllm is not installed; "
                              "pip install 'almost-utils[vllm]' (CUDA only) or set sampling.backend: "
                              "transformers") from None
        kind = check_source(spec.source)
        if kind == "tiny":
            raise ConfigError(f"sampling.backend: vllm cannot build tiny random models ({spec.source}); "
                              "use sampling.backend: transformers")
        if getattr(spec, "num_layers", None) is not None or getattr(spec, "drop_layers", None):
            raise ConfigError("sampling.backend: vllm cannot drop decoder layers; "
                              "use sampling.backend: transformers or a real smaller model")
        if not 0 < sampling_cfg.gpu_memory_utilization <= 1:
            raise ConfigError("sampling.gpu_memory_utilization: must be in (0, 1], got "
                              f"{sampling_cfg.gpu_memory_utilization}")
        if sampling_cfg.tensor_parallel_size < 1:
            raise ConfigError(f"sampling.tensor_parallel_size: must be >= 1, got {sampling_cfg.tensor_parallel_size}")
        self.spec, self.seed, self.progress = spec, seed, progress
        self.tokenizer = load_tokenizer(spec)   # the transformers engine's tokenizer, same ids
        kwargs = dict(
            model=resolve_source(spec.source),
            tokenizer=resolve_source(spec.source),
            enable_prefix_caching=True,
            seed=seed,
            gpu_memory_utilization=sampling_cfg.gpu_memory_utilization,
            tensor_parallel_size=sampling_cfg.tensor_parallel_size,
            # the transformers engine computes in bf16 on CUDA for dtype auto
            dtype="bfloat16" if spec.dtype == "auto" else spec.dtype,
        )
        if sampling_cfg.max_model_len:
            kwargs["max_model_len"] = sampling_cfg.max_model_len
        if spec.load_in_4bit:
            kwargs["quantization"] = "bitsandbytes"   # NF4 weights, as load_in_4bit does in transformers
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def _ids(self, prefix: str, prompts: list[str]) -> list[list[int]]:
        head = self.tokenizer(prefix, add_special_tokens=True)["input_ids"]
        tails = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        return [list(head) + list(t) for t in tails]

    def generate(self, prompts: list[str], params, prefix: str = "", desc=None) -> list[str]:
        """Completions for ``prefix + prompt``, one per prompt, in input order."""
        prompts = list(prompts)
        if not prompts:
            return []
        stop = [s for s in (params.stop or ()) if s]
        sampling = [self._vllm.SamplingParams(
            n=1,
            temperature=float(params.temperature),        # 0 = greedy, as in the transformers engine
            top_p=float(params.top_p) if params.temperature > 0 else 1.0,
            max_tokens=int(params.max_new_tokens),
            stop=stop or None,
            include_stop_str_in_output=False,
            skip_special_tokens=True,
            seed=request_seed(params.seed, i),
        ) for i in range(len(prompts))]
        requests = [{"prompt_token_ids": ids} for ids in self._ids(prefix, prompts)]
        if desc and self.progress:
            print(desc, flush=True)
        outputs = self.llm.generate(requests, sampling, use_tqdm=self.progress)
        # vLLM returns outputs in request order; cut again in case a stop string was split
        # across detokenization steps
        return [cut_at_stop(o.outputs[0].text, stop) for o in outputs]

    def close(self) -> None:
        """Free the GPU memory (before the next model or the RM step in the same process)."""
        import gc
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
