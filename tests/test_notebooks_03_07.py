"""Notebooks 03 (self-play), 04 (SFT), 05 (PPO), 06 (evaluation) and 07 (analysis) run end to end
on the tiny recipe (papermill); PPO resumes after an interruption to the same steps, and runs under
``accelerate launch`` with two processes; rerunning notebook 07 rewrites the same tables.

They build on notebook 01's tiny run (the session fixture ``tiny_run``) and a Step-2 RM trained
here by the real stage (one RM: the no-filter ablation is off to save time).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from almost_utils.artifacts import read_json, read_jsonl
from almost_utils.config import load_config
from almost_utils.fingerprint import check_run
from almost_utils.reward_stage import run_reward_model_stage
from conftest import ROOT, TINY, run_notebook

OVER = {"reward_model.ablation_no_heuristic_filter": False}


def _outputs(executed) -> tuple[list, str]:
    nb = json.loads(executed.read_text())
    outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    errors = [o for o in outs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/markdown", ""))
                   + "".join(o.get("data", {}).get("text/plain", "")) for o in outs)
    return errors, text


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    out = tmp_path_factory.mktemp("nb0304") / "run"
    cfg = load_config(TINY, {"output_dir": str(out), **OVER})
    for stage in ("queries", "comparisons"):
        shutil.copytree(tiny_run / stage, out / stage)
    run_reward_model_stage(cfg, progress=False)
    nb03 = run_notebook("03_rmsp", out / "notebooks", output_dir=str(out), **OVER)
    nb04 = run_notebook("04_sft", out / "notebooks", output_dir=str(out), **OVER)
    nb05 = run_notebook("05_ppo", out / "notebooks", output_dir=str(out), **OVER)
    nb06 = run_notebook("06_evaluation", out / "notebooks", output_dir=str(out), **OVER)
    nb07 = run_notebook("07_analysis", out / "notebooks", output_dir=str(out), **OVER)
    return {"cfg": cfg, "03": nb03, "04": nb04, "05": nb05, "06": nb06, "07": nb07}


def test_notebook03_plays_dialogues_and_draws_its_figures(run):
    cfg, nb03 = run["cfg"], run["03"]
    errors, text = _outputs(nb03)
    assert not errors
    assert "kept candidate" in text and "Best of 3" in text and "RM's pick is the longest" in text
    stage = cfg.run_dir / "rmsp"
    cands = read_jsonl(stage / "candidates.jsonl")
    assert cands and all(len(c["candidates"]) == cfg.rmsp.candidates for c in cands)
    assert len(read_jsonl(stage / "dialogues_random.jsonl")) == len({c["dialogue_id"] for c in cands if c["turn"] == 0})
    for name in ("best_of_n", "candidates", "dialogue_lengths"):
        assert (stage / "figures" / f"{name}.png").stat().st_size > 1000


def test_notebook04_trains_both_variants_and_compares_three_policies(run):
    cfg, nb04 = run["cfg"], run["04"]
    errors, text = _outputs(nb04)
    assert not errors
    assert "ALMoST-SFT vs SFT-noRM" in text
    for variant in ("sft", "sft_norm"):
        assert (cfg.run_dir / variant / "adapter" / "adapter_model.safetensors").is_file()
        assert read_jsonl(cfg.run_dir / variant / "loss_curve.jsonl")
    answers = read_jsonl(cfg.run_dir / "sft_answers" / "answers.jsonl")
    n = len(read_jsonl(cfg.run_dir / "splits" / "queries.jsonl"))
    assert {r["policy"] for r in answers} == {"vanilla", "sft_norm", "sft"}
    assert len(answers) == 3 * cfg.answers.samples * sum(1 for r in read_jsonl(cfg.run_dir / "splits" / "queries.jsonl")
                                                           if r["split"] == cfg.answers.split) and n > 0
    summary = read_json(cfg.run_dir / "sft_answers" / "summary.json")
    assert set(summary["differences"]) == {"sft - sft_norm", "sft - vanilla", "sft_norm - vanilla"}
    for name in ("sft_loss", "heldout_answers"):
        assert (cfg.run_dir / "sft_answers" / "figures" / f"{name}.png").stat().st_size > 1000
    assert all(check_run(cfg)[s] == "done" for s in ("rmsp", "sft", "sft_norm", "sft_answers"))


PLAIN = ("step", "rm_score", "kl", "kl_coef", "response_tokens", "ended", "pg_loss", "vf_loss", "entropy")


def _plain(log):
    return [{k: r[k] for k in PLAIN} for r in log]


def test_notebook05_trains_ppo_and_compares_it_with_sft(run):
    cfg, nb05 = run["cfg"], run["05"]
    errors, text = _outputs(nb05)
    assert not errors
    assert "Training." in text and "at equal length" in text
    log = read_jsonl(cfg.run_dir / "ppo" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, cfg.ppo.steps + 1)) and log[0]["kl"] == 0.0
    assert (cfg.run_dir / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (cfg.run_dir / "ppo" / "checkpoint").exists()
    summary = read_json(cfg.run_dir / "ppo_answers" / "summary.json")
    assert "ppo - sft" in summary["differences"]
    for name in ("ppo_curves", "ppo_length"):
        assert (cfg.run_dir / "ppo" / "figures" / f"{name}.png").stat().st_size > 1000
    assert set(check_run(cfg).values()) == {"done"}


def _copy_without_ppo(cfg, dest):
    shutil.copytree(cfg.run_dir, dest, ignore=shutil.ignore_patterns("ppo", "ppo_answers", "evaluation", "analysis",
                                                                     "notebooks"))
    return load_config(TINY, {"output_dir": str(dest), **OVER})


def test_an_interrupted_ppo_resumes_with_the_same_steps(run, tmp_path):
    from almost_utils.ppo import rm_reward, run_ppo_stage
    from almost_utils.reward import load_reward_model
    cfg = run["cfg"]
    copy = _copy_without_ppo(cfg, tmp_path / "copy")
    rm = rm_reward(load_reward_model(copy.run_dir / "reward_model", "cpu"))
    calls = []

    def killed_in_step_4(queries, texts):                              # the RM, then a Ctrl-C
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return rm(queries, texts)
    with pytest.raises(KeyboardInterrupt):
        run_ppo_stage(copy, progress=False, reward_fn=killed_in_step_4)
    assert check_run(copy)["ppo"] == "resume" and len(read_jsonl(copy.run_dir / "ppo" / "log.jsonl")) == 3
    ckpt = copy.run_dir / "ppo" / "checkpoint"
    assert len(read_jsonl(ckpt / "log.jsonl")) == 2                      # the last checkpoint: step 2
    log = run_ppo_stage(copy, progress=False)
    assert [r["step"] for r in log] == list(range(1, copy.ppo.steps + 1))
    ref = read_jsonl(cfg.run_dir / "ppo" / "log.jsonl")
    for a, b in zip(_plain(log), _plain(ref)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_ppo_under_accelerate_launch_with_two_processes(run, tmp_path):
    cfg = run["cfg"]
    copy = _copy_without_ppo(cfg, tmp_path / "two")
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [shutil.which("accelerate", path=env["PATH"]), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "almost_utils.cli", "ppo",
           "--config", str(TINY), "--overrides", json.dumps({"output_dir": str(copy.run_dir), **OVER})]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    man = read_json(copy.run_dir / "ppo" / "manifest.json")
    assert man["counts"]["world_size"] == 2 and man["counts"]["steps"] == copy.ppo.steps
    log = read_jsonl(copy.run_dir / "ppo" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, copy.ppo.steps + 1)) and log[0]["kl"] == 0.0
    assert (copy.run_dir / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((copy.run_dir / "ppo").glob(".manifest*"))


def test_notebook06_evaluates_every_policy(run):
    cfg = run["cfg"]
    errors, text = _outputs(run["06"])
    assert not errors
    assert "length-controlled" in text and "No judge endpoint configured" in text and 'P(" A")' in text
    summary = read_json(cfg.run_dir / "evaluation" / "summary.json")
    policies = set(cfg.evaluation.policies)
    for ev in ("hhh_judge", "hhh_likelihood", "truthfulqa", "refusals"):
        assert {r["policy"] for r in summary[ev]} == policies
    assert len(summary["pairwise"]["rm"]) == len(policies) * (len(policies) - 1) // 2
    for name in ("hhh_by_category", "win_rates", "answer_lengths", "truthfulqa_refusals"):
        assert (cfg.run_dir / "evaluation" / "figures" / f"{name}.png").stat().st_size > 1000
    assert check_run(cfg)["evaluation"] == "done"


def test_notebook07_rebuilds_the_same_tables_on_a_rerun(run, tmp_path):
    cfg = run["cfg"]
    errors, text = _outputs(run["07"])
    assert not errors and ("supported" in text or "not shown" in text)
    folder = cfg.run_dir / "analysis"
    names = ("rm_accuracy", "policies", "hhh_by_category", "pairwise", "claims", "stage_times")
    first = {n: (folder / f"{n}.md").read_bytes() + (folder / f"{n}.csv").read_bytes() for n in names}
    for name in ("win_rates", "answer_lengths", "hhh_by_category", "ppo_curves", "best_of_n"):
        assert (folder / "figures" / f"{name}.png").stat().st_size > 1000
    again = run_notebook("07_analysis", tmp_path, output_dir=str(cfg.run_dir), **OVER)
    assert not _outputs(again)[0]
    assert {n: (folder / f"{n}.md").read_bytes() + (folder / f"{n}.csv").read_bytes() for n in names} == first
