"""The scale-up recipes (gpu, paper), their memory estimate, the vLLM switch and the accelerate
configs - all checked on a CPU, offline."""
import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from almost_utils import engines
from almost_utils.config import ConfigError, load_config
from almost_utils.memory import (KNOWN_ARCHS, STAGES, Arch, estimate_memory, estimate_rows,
                                 format_memory_table, main as memory_main)
from almost_utils.models import check_models, check_source

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "data" / "configs"
SCALES = ["gpu", "paper"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("scale", SCALES)
def test_scale_config_loads(scale, tmp_path):
    cfg = load_config(CONFIGS / f"{scale}.yaml", {"output_dir": str(tmp_path)})
    assert cfg.device == "cuda"
    assert cfg.comparisons.max_new_tokens == {"faithful": 768, "hhh": 384}
    rm = cfg.reward_model
    assert rm.gradient_checkpointing and rm.max_length == 1024
    # the rubric uses models of one family, largest first
    sizes = [Arch.from_config(KNOWN_ARCHS[cfg.models[c.model].source]).params()
             for rank in cfg.comparisons.rubric for c in rank]
    assert sizes == sorted(sizes, reverse=True)


def test_gpu_recipe_is_qlora_with_128_pairs_per_step():
    cfg = load_config(CONFIGS / "gpu.yaml")
    rm = cfg.reward_model
    spec = cfg.models[rm.model]
    assert spec.load_in_4bit
    assert rm.batch_size * rm.grad_accum == 128
    sampled = {c.model for rank in cfg.comparisons.rubric for c in rank} | {cfg.queries.model}
    assert not any(cfg.models[k].load_in_4bit for k in sampled), "sampling models load in bf16"


def test_paper_recipe_mirrors_the_paper_sizes():
    cfg = load_config(CONFIGS / "paper.yaml")
    sources = {s.source for s in cfg.models.values()}
    assert {"huggyllama/llama-7b", "huggyllama/llama-13b", "huggyllama/llama-30b"} <= sources
    assert cfg.models[cfg.reward_model.model].source == "huggyllama/llama-7b"
    rm = cfg.reward_model
    assert rm.batch_size * rm.grad_accum * 8 == 128      # on 8 GPUs (accelerate num_processes)


@pytest.mark.parametrize("scale", SCALES)
def test_model_sources_are_hub_ids_resolved_offline(scale, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("tried to reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    cfg = load_config(CONFIGS / f"{scale}.yaml")
    check_models(cfg)
    for name, spec in cfg.models.items():
        assert check_source(spec.source, f"models.{name}.source") == "hub"
        assert spec.source in KNOWN_ARCHS, f"{spec.source}: no offline size"


def test_known_sizes_match_published_parameter_counts():
    published = {"Qwen/Qwen2.5-0.5B": 0.49e9, "Qwen/Qwen2.5-1.5B": 1.54e9, "Qwen/Qwen2.5-3B": 3.09e9,
                 "Qwen/Qwen2.5-7B": 7.62e9, "huggyllama/llama-7b": 6.74e9, "huggyllama/llama-13b": 13.0e9,
                 "huggyllama/llama-30b": 32.5e9, "google/gemma-3-270m": 268e6,
                 "HuggingFaceTB/SmolLM2-135M-Instruct": 134.5e6}
    for hub_id, n in published.items():
        assert Arch.from_config(KNOWN_ARCHS[hub_id]).params() == pytest.approx(n, rel=0.01), hub_id


@pytest.mark.parametrize("scale", SCALES)
def test_memory_estimate_prints_every_stage(scale, capsys):
    assert memory_main([str(CONFIGS / f"{scale}.yaml"), "--gpu-gib", "24"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(CONFIGS / f"{scale}.yaml")
    # every stage of the recipe (gpu has no ppo section: PPO at 7B does not fit its 24 GB card)
    section = {"reward_model": "reward_model", "rmsp": "rmsp", "sft": "sft", "ppo": "ppo", "sft_answers": "answers"}
    expected = {s for s in STAGES if getattr(cfg, section.get(s, "queries")) is not None}
    assert expected >= {"queries", "comparisons", "reward_model", "rmsp", "sft", "sft_answers"}
    for stage in expected:
        assert stage in out
    assert "peak per stage" in out and "CONTEXT TOO SHORT" not in out
    est = estimate_memory(cfg)
    assert set(est) == expected
    assert all(isinstance(v, float) and v > 0 for v in est.values())


def test_gpu_recipe_fits_24_gib():
    cfg = load_config(CONFIGS / "gpu.yaml")
    est = estimate_memory(cfg)
    assert max(est.values()) < 24, est
    rows = {(r.stage, r.model): r for r in estimate_rows(cfg)}
    rm = rows[("reward_model", "rm7b")]
    assert rm.precision.startswith("nf4")
    # 4-bit weights of a 7B are a fraction of its bf16 weights
    assert rm.parts["weights"] < 0.4 * rows[("comparisons", "qwen7b")].parts["weights"]


def test_memory_cli_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "almost_utils.memory", str(CONFIGS / "gpu.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "reward_model" in out.stdout and "Qwen/Qwen2.5-7B" in out.stdout


def test_unknown_hub_model_gives_an_unknown_size_entry():
    cfg = load_config(CONFIGS / "gpu.yaml", {"models.rm7b.source": "someorg/mystery-9b"})
    est = estimate_memory(cfg)
    assert isinstance(est["reward_model"], str) and "unknown size" in est["reward_model"]
    assert isinstance(est["queries"], float)
    table = format_memory_table(cfg)
    assert "someorg/mystery-9b" in table and "unknown size" in table


def test_too_long_prompt_is_flagged():
    cfg = load_config(CONFIGS / "paper.yaml", {"comparisons.rubric": [
        {"model": "llama30b", "demos": "faithful", "shots": 3}, {"model": "llama7b", "demos": "hhh", "shots": 1}]})
    rows = {(r.stage, r.model): r for r in estimate_rows(cfg)}
    assert not rows[("comparisons", "llama30b")].fits_context
    assert "CONTEXT TOO SHORT" in format_memory_table(cfg)


def test_tiny_recipe_estimate_works_too():
    est = estimate_memory(load_config(CONFIGS / "tiny.yaml"))
    assert set(est) == set(STAGES)


# --------------------------------------------------------------------------- vLLM switch
def _hide_vllm(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)


def test_vllm_backend_without_vllm_names_the_extra(monkeypatch, tmp_path):
    _hide_vllm(monkeypatch)
    cfg = load_config(CONFIGS / "gpu.yaml", {"sampling.backend": "vllm", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        engines.load_engine(cfg, "qwen7b")
    msg = str(err.value)
    assert "sampling.backend" in msg and "almost-utils[vllm]" in msg


def test_vllm_engine_itself_names_the_extra(monkeypatch):
    _hide_vllm(monkeypatch)
    from almost_utils.vllm_engine import VLLMEngine
    cfg = load_config(CONFIGS / "paper.yaml")
    with pytest.raises(ConfigError, match=r"almost-utils\[vllm\]"):
        VLLMEngine(cfg.models["llama7b"], cfg.sampling, seed=cfg.seed)


def test_vllm_helpers():
    from almost_utils.vllm_engine import cut_at_stop, request_seed
    assert cut_at_stop("a.\nHuman: b", ["\nHuman:", "\nAssistant:"]) == "a."
    assert cut_at_stop("no stop", ["\nHuman:"]) == "no stop"
    assert cut_at_stop("x\nAssistant: y\nHuman: z", ["\nHuman:", "\nAssistant:"]) == "x"
    seeds = [request_seed(5, i) for i in range(4)]
    assert len(set(seeds)) == 4 and seeds == [request_seed(5, i) for i in range(4)]


# --------------------------------------------------------------------------- accelerate
@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs(name, kind):
    data = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())
    assert data["distributed_type"] == kind
    assert data["mixed_precision"] == "bf16"
    assert data["num_processes"] >= 2 and data["num_machines"] == 1
    if kind == "FSDP":
        assert data["fsdp_config"]["fsdp_use_orig_params"] is False          # peft + QLoRA
        assert data["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    if kind == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] == 3
        assert data["deepspeed_config"]["zero3_init_flag"] is True
        assert "gradient_accumulation_steps" not in data["deepspeed_config"]  # the Trainer fills it


def test_accelerate_config_is_accepted_by_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
        assert cfg.num_processes >= 2


def test_gpu_smoke_script_is_not_collected_and_is_executable():
    sh = ROOT / "scripts" / "gpu_smoke.sh"
    assert sh.is_file() and sh.stat().st_mode & 0o111
    assert "gpu_smoke.py" in sh.read_text()
    src = (ROOT / "scripts" / "gpu_smoke.py").read_text()
    compile(src, "gpu_smoke.py", "exec")


@pytest.mark.parametrize("scale, without", [("cpu", []), ("gpu", ["05_ppo"]), ("paper", [])])
def test_run_all_runs_the_notebooks_a_recipe_has_sections_for(scale, without, capsys):
    from almost_utils.cli import NOTEBOOKS, main
    assert main(["notebooks", "--config", str(CONFIGS / f"{scale}.yaml")]) == 0
    assert capsys.readouterr().out.split() == [nb for nb in NOTEBOOKS if nb not in without]
    assert sorted(NOTEBOOKS) == sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
