"""Step 4 (SFT) on the tiny recipe: the assistant-only loss mask, the cheap output layer's loss,
training, saving and reloading the policy, the engine against a plain forward, bad input that
stops before a model loads, and resuming an interrupted training."""
import random

import pytest
import torch

from almost_utils import sft as S
from almost_utils.artifacts import read_json, read_jsonl, write_jsonl
from almost_utils.config import ConfigError, load_config
from almost_utils.fingerprint import stage_status
from almost_utils.models import load_model, load_tokenizer
from almost_utils.dialogue import STOP_STRINGS
from almost_utils.sampling import SamplingParams, cut_at_stop
from conftest import TINY, claim_upstream

UPSTREAM = ("queries", "comparisons", "reward_model", "splits", "rmsp")
WORDS = "river garden engine violin tax recipe galaxy bicycle poem router winter lawyer puppy".split()


def _dialogue(i: int) -> dict:
    rng = random.Random(i)
    a, b = rng.sample(WORDS, 2)
    return {"id": i, "turns": [["Human", f"How does a {a} work?"], ["Assistant", f"A {a} works with a {b}. " * 2],
                               ["Human", f"And the {b}?"], ["Assistant", f"The {b} is simple."]]}


def _cfg(out, **extra):
    return load_config(TINY, {"output_dir": str(out), **extra})


def _finished_rmsp(out, rows=None, name="dialogues.jsonl", **extra):
    """A tiny run whose Steps 0-3 count as finished, with hand-made dialogues in the rmsp folder."""
    cfg = _cfg(out, **extra)
    claim_upstream(cfg, UPSTREAM)
    write_jsonl(cfg.run_dir / "rmsp" / name, [_dialogue(i) for i in range(8)] if rows is None else rows)
    return cfg


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(_cfg("unused").models["large"])


@pytest.fixture
def no_model_loads(monkeypatch):
    import almost_utils.models as models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(models, "load_model", refuse)


# --------------------------------------------------------------------------- the loss mask
def test_assistant_mask_covers_exactly_every_answer_and_its_eos(tok):
    turns = [("Human", "What is two plus two?"), ("Assistant", "Four."),
             ("Human", "And three plus two?"), ("Assistant", "Five, of course.")]
    ids, mask = S.encode_exchanges(tok, S.exchanges(turns))
    p1 = tok("\n\nHuman: What is two plus two?\n\nAssistant:").input_ids          # BOS first
    a1 = tok(" Four.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    p2 = tok("\n\nHuman: And three plus two?\n\nAssistant:", add_special_tokens=False).input_ids
    a2 = tok(" Five, of course.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids == p1 + a1 + p2 + a2
    assert mask == [0] * len(p1) + [1] * len(a1) + [0] * len(p2) + [1] * len(a2)
    assert ids[0] == tok.bos_token_id
    start2 = len(p1) + len(a1) + len(p2)
    assert [i for i, m in enumerate(mask) if m] == (list(range(len(p1), len(p1) + len(a1)))
                                                    + list(range(start2, start2 + len(a2))))
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == " Four.<eos> Five, of course.<eos>"
    # the first prompt is exactly what the engine tokenizes at inference
    assert ids[:len(p1)] == tok(S.prompt_piece("What is two plus two?")).input_ids


def test_too_long_dialogues_lose_leading_exchanges_then_get_cut_then_dropped(tok):
    turns = [("Human", "First question here?"), ("Assistant", "A long first answer. " * 6),
             ("Human", "Second?"), ("Assistant", "Short.")]
    full, _ = S.encode_exchanges(tok, S.exchanges(turns))
    last, last_mask = S.encode_exchanges(tok, S.exchanges(turns[2:]))
    ids, mask, what = S.fit_dialogue(tok, turns, len(full))
    assert what == "kept" and ids == full
    ids, mask, what = S.fit_dialogue(tok, turns, len(last))
    assert what == "truncated" and (ids, mask) == (last, last_mask) and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]).startswith("\n\nHuman: Second?")
    ids, mask, what = S.fit_dialogue(tok, turns, last_mask.index(1) + 1)
    assert what == "cut" and mask[-1] == 1 and ids[-1] != tok.eos_token_id and len(ids) == last_mask.index(1) + 1
    assert S.fit_dialogue(tok, turns, last_mask.index(1)) == (None, None, "dropped")
    data, counts = S.sft_dataset([{"turns": turns}] * 2, tok, len(last))
    assert counts["truncated"] == 2 and len(data) == 2 and counts["assistant_tokens"] == 2 * sum(last_mask)


# --------------------------------------------------------------------------- the cheap output layer
@pytest.mark.parametrize("softcap,chunk", [(None, 512), (None, 3), (0.5, 4)])   # tiny logits are < 1: a small cap bites
def test_masked_head_gives_the_full_logits_loss_and_gradients(tmp_path, tok, softcap, chunk):
    from peft import get_peft_model
    cfg = _cfg(tmp_path)
    model, _ = load_model(cfg.models["large"], "cpu", cfg.seed)
    model.config.final_logit_softcapping = softcap
    S.add_masked_head(model, chunk)
    peft = get_peft_model(model, S.lora_config(cfg.sft, 2))
    for name, p in peft.named_parameters():
        if "lora_B" in name:                  # non-zero adapters, so that their gradients mean something
            torch.nn.init.normal_(p, std=0.1)
    peft.eval()                               # no dropout: both passes see the same network
    a, ma = S.encode_exchanges(tok, S.exchanges(_dialogue(1)["turns"]))
    b, mb = S.encode_exchanges(tok, S.exchanges(_dialogue(2)["turns"][:2]))
    width = max(len(a), len(b))
    ids = torch.tensor([a + [0] * (width - len(a)), b + [0] * (width - len(b))])
    attn = torch.tensor([[1] * len(a) + [0] * (width - len(a)), [1] * len(b) + [0] * (width - len(b))])
    labels = torch.tensor([[t if m else -100 for t, m in zip(r + [0] * (width - len(r)), k + [0] * (width - len(k)))]
                           for r, k in ((a, ma), (b, mb))])
    params = [p for p in peft.parameters() if p.requires_grad]
    full = peft(input_ids=ids, attention_mask=attn, labels=labels).loss
    g_full = torch.autograd.grad(full, params)
    out = peft(input_ids=ids, attention_mask=attn, labels=labels, masked_head=True)
    g_masked = torch.autograd.grad(out.loss, params)
    assert int(out.n_tokens) == sum(ma) + sum(mb)
    assert abs(full.item() - out.loss.item()) < 1e-5
    scale = max(g.abs().max().item() for g in g_full)
    assert scale > 1e-3
    assert max((g - h).abs().max().item() for g, h in zip(g_full, g_masked)) < 1e-5 * max(1.0, scale)


def test_trainer_builds_labels_from_the_assistant_mask(tmp_path, tok):
    cfg = _cfg(tmp_path)
    rows = [_dialogue(i) for i in range(3)]
    data, _ = S.sft_dataset(rows, tok, cfg.sft.max_length)
    model, tok2 = load_model(cfg.models["large"], "cpu", cfg.seed)
    trainer = S.build_trainer(cfg, model, tok2, data, tmp_path / "ckpt", progress=False)
    for i, row in enumerate(trainer.train_dataset):
        ids, mask, _ = S.fit_dialogue(tok, rows[i]["turns"], cfg.sft.max_length)
        assert row["input_ids"] == ids
        assert row["labels"] == [t if m else -100 for t, m in zip(ids, mask)]


# --------------------------------------------------------------------------- training, saving, loading
def test_training_lowers_the_loss_and_the_adapter_reloads_to_identical_logprobs(tmp_path):
    cfg = _finished_rmsp(tmp_path / "run")
    rows = S.read_dialogues(S.dialogues_path(cfg, "sft"))
    summary, trained = S.train_sft(cfg, rows, cfg.stage_dir("sft"), "sft", progress=False, return_policy=True)
    curve = read_jsonl(cfg.run_dir / "sft" / "loss_curve.jsonl")
    assert summary["optimizer_steps"] == 12 == len(curve)                  # 8 dialogues / 2 x 3 epochs
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.1
    assert not (cfg.run_dir / "sft" / "checkpoints").exists()                # removed once the adapter is saved
    meta = read_json(cfg.run_dir / "sft" / "adapter" / "policy.json")
    assert meta["seed"] == cfg.seed and meta["sft_config"]["max_length"] == cfg.sft.max_length

    queries = ["How does a poem work?", [("Human", "Hi?"), ("Assistant", "Hello."), ("Human", "And the tax?")]]
    answers = ["A poem works with a tax.", "The tax is simple."]
    before = trained.logprobs(queries, answers, eos=True)
    loaded = S.load_policy(cfg.run_dir, "sft", device="cpu")                # merged into a fresh base copy
    after = loaded.logprobs(queries, answers, eos=True)
    for x, y in zip(before, after):
        assert x["ids"] == y["ids"] and x["ids"][-1] == loaded.tokenizer.eos_token_id
        assert max(abs(a - b) for a, b in zip(x["tokens"], y["tokens"])) < 1e-5
    vanilla = S.load_policy(cfg.run_dir, "sft", vanilla=True, device="cpu").logprobs(queries, answers, eos=True)
    assert max(abs(x["sum"] - v["sum"]) for x, v in zip(after, vanilla)) > 1e-2   # training changed something
    assert S.load_policy(cfg, vanilla=True).logprobs(queries, answers, eos=True)[0]["sum"] == \
        pytest.approx(vanilla[0]["sum"], abs=1e-5)                           # the recipe's vanilla = the adapter's base


def test_engine_greedy_tokens_agree_with_plain_forward_logprobs(tmp_path):
    cfg = _cfg(tmp_path)
    policy = S.load_policy(cfg, vanilla=True, progress=False)
    queries = ["How does a violin work?", "Tell me about winter.",
               [("Human", "Hi?"), ("Assistant", "Hello."), ("Human", "And the tax?")]]
    greedy = policy.generate_tokens(queries, SamplingParams(max_new_tokens=8, temperature=0.0))
    scored = policy.logprobs(queries, greedy)
    texts = policy.generate(queries, SamplingParams(max_new_tokens=8, temperature=0.0))
    for q, ids, s, text in zip(queries, greedy, scored, texts):
        assert ids and s["ids"] == ids
        prompt = policy.prompt_ids(q)
        assert prompt == policy.tokenizer(policy.prompt_text(q)).input_ids    # the engine's ids = training's
        seq = torch.tensor([prompt + ids])
        with torch.no_grad():
            logits = policy.model(input_ids=seq).logits[0, len(prompt) - 1:-1].float()
        assert logits.argmax(-1).tolist() == ids                              # greedy under a plain forward
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
        assert max(abs(a - b) for a, b in zip(s["tokens"], ref.tolist())) < 1e-4
        assert s["sum"] == pytest.approx(sum(s["tokens"]))
        decoded = policy.tokenizer.decode(ids, skip_special_tokens=True)
        assert text == cut_at_stop(decoded, STOP_STRINGS)[0].strip()


# --------------------------------------------------------------------------- bad input
def test_bad_input_stops_before_a_model_loads_and_names_it(tmp_path, no_model_loads):
    cfg = _finished_rmsp(tmp_path / "missing", rows=[], name="other.jsonl")
    with pytest.raises(ConfigError, match=r"sft.dialogues.sft: file not found: .*rmsp/dialogues.jsonl"):
        S.run_sft_stage(cfg, "sft", progress=False)
    cfg = _finished_rmsp(tmp_path / "empty", rows=[])
    with pytest.raises(ConfigError, match=r"dialogues.jsonl holds no dialogues"):
        S.run_sft_stage(cfg, "sft", progress=False)
    cfg = _finished_rmsp(tmp_path / "field", rows=[{"id": 0, "messages": _dialogue(0)["turns"]}])
    with pytest.raises(ConfigError, match=r"line 1: no field 'turns' \(sft.turns_field\); the row has: id, messages"):
        S.run_sft_stage(cfg, "sft", progress=False)
    cfg = _finished_rmsp(tmp_path / "roles", rows=[_dialogue(0), {"turns": [["Human", "a"], ["Human", "b"]]}])
    with pytest.raises(ConfigError, match=r"line 2: turn 2 should be Assistant"):
        S.run_sft_stage(cfg, "sft", progress=False)
    cfg = _cfg(tmp_path / "no_rmsp")
    claim_upstream(cfg, UPSTREAM[:-1])
    with pytest.raises(ConfigError, match=r"Step 3 \(RMSP\) has not finished"):
        S.run_sft_stage(cfg, "sft_norm", progress=False)
    with pytest.raises(ConfigError, match=r"sft.turn_field: unknown field"):
        _cfg(tmp_path / "x", **{"sft.turn_field": "turns"})
    with pytest.raises(ConfigError, match=r"sft.dialogues: give exactly the files for sft and sft_norm"):
        _cfg(tmp_path / "x", **{"sft.dialogues": {"sft": "d.jsonl"}})
    with pytest.raises(ConfigError, match=r"sft.model: unknown model 'huge'"):
        _cfg(tmp_path / "x", **{"sft.model": "huge"})


# --------------------------------------------------------------------------- resuming
class _Interrupt:
    """A TrainerCallback that stops training like a Ctrl-C at the end of optimizer step ``at``."""

    def __new__(cls, at: int):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    raise KeyboardInterrupt
        return Stop()


def test_an_interrupted_training_resumes_from_its_checkpoint_to_the_same_adapter(tmp_path):
    whole = _finished_rmsp(tmp_path / "whole", name="dialogues_random.jsonl")
    first = S.run_sft_stage(whole, "sft_norm", progress=False)
    assert stage_status(whole, "sft_norm") == "done" and first["resumed_from"] is None

    cfg = _finished_rmsp(tmp_path / "cut", name="dialogues_random.jsonl")
    with pytest.raises(KeyboardInterrupt):
        S.run_sft_stage(cfg, "sft_norm", progress=False, callbacks=[_Interrupt(5)])
    stage = cfg.run_dir / "sft_norm"
    assert stage_status(cfg, "sft_norm") == "resume"
    assert sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (stage / "adapter").exists() and not (stage / "manifest.json").exists()
    (stage / "checkpoints" / "checkpoint-6").mkdir()                   # a checkpoint a kill left half-written
    again = S.run_sft_stage(cfg, "sft_norm", progress=False)
    assert again["resumed_from"] == "checkpoint-4" and again["optimizer_steps"] == first["optimizer_steps"]
    assert stage_status(cfg, "sft_norm") == "done" and not (stage / "checkpoints").exists()
    curve_a = read_jsonl(whole.run_dir / "sft_norm" / "loss_curve.jsonl")
    curve_b = read_jsonl(stage / "loss_curve.jsonl")
    assert [r["step"] for r in curve_b] == list(range(1, 13))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(curve_a, curve_b)) < 1e-5
    q, r = ["How does a tax work?"], ["A tax works with a river."]
    la = S.load_policy(whole.run_dir, "sft_norm", device="cpu").logprobs(q, r)[0]["tokens"]
    lb = S.load_policy(cfg.run_dir, "sft_norm", device="cpu").logprobs(q, r)[0]["tokens"]
    assert max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    assert S.run_sft_stage(cfg, "sft_norm", progress=False) == again    # finished: reused, nothing trained
    manifest = read_json(stage / "manifest.json")
    assert manifest["counts"]["optimizer_steps"] == 12 and manifest["notes"]["tokens_per_s"] > 0
