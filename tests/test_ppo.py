"""Step 5 (PPO, almost_utils/ppo.py): the arithmetic against hand computations, the policy and
reference on a tiny model, learning from a programmatic reward, resuming, and bad input."""
import math

import numpy as np
import pytest
import torch

from almost_utils import ppo as P
from almost_utils.config import ConfigError, ModelSpec, TinySpec, load_config
from conftest import TINY, claim_upstream


# --------------------------------------------------------------------------- arithmetic
def test_gae_matches_a_hand_computation_and_stops_at_the_last_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])      # 9.0 sits on padding: must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    adv, ret = P.gae(rewards, values, mask, g, lam)
    # row 0: deltas d2 = 1 - .3, d1 = 0 + .9*.3 - .2, d0 = 0 + .9*.2 - .1
    d2, d1, d0 = 1 - 0.3, 0.9 * 0.3 - 0.2, 0.9 * 0.2 - 0.1
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    # row 1 ends at t = 1: V after it is 0
    e1, e0 = 2.0 - 0.5, 0.5 + 0.9 * 0.5 - 0.4
    assert adv[1].tolist() == pytest.approx([e0 + g * lam * e1, e1, 0.0])
    torch.testing.assert_close(ret, adv + values * mask)


def test_whitening_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = P.masked_whiten(x, mask)
    real = np.array([1.0, 2.0, 3.0, 4.0])
    expect = (real - real.mean()) / real.std(ddof=1)
    assert w[mask.bool()].tolist() == pytest.approx(expect.tolist(), abs=1e-5)
    assert w[~mask.bool()].tolist() == [0.0, 0.0]
    assert P.masked_whiten(x, mask, shift_mean=False)[mask.bool()].mean().item() == pytest.approx(real.mean(), abs=1e-5)


def test_token_rewards_put_the_score_on_the_last_token_and_charge_the_kl_everywhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.1, -0.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = P.token_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.5], [-0.2, 0.2, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, -0.05 + 2.0], [0.02, -0.02 - 1.0, 0.0]]))


def test_clipped_losses_on_known_tensors():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.9, 1.1]]))                # ratios 1.5, 0.9, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    values, old_v, ret = torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.5, 0.0, 0.5]]), torch.tensor([[2.0, 1.0, 0.5]])
    pg, vf, st = P.ppo_losses(logp, old, values, old_v, adv, ret, mask, clip_range=0.2, value_clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (1.5 clipped to 1.2), 0.9, -2.2
    assert pg.item() == pytest.approx((-1.2 + 0.9 - 2.2) / 3)
    # values: v_clip = .7, 0, .5; max((v-R)^2, (vclip-R)^2) = max(1, 1.69), max(1, 1), 0
    assert vf.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.0) / 3)
    assert st["clipfrac"] == pytest.approx(1 / 3)
    assert st["approx_kl"] == pytest.approx(0.5 * np.mean(np.log([1.5, 0.9, 1.1]) ** 2), rel=1e-5)


def test_kl_controller_and_running_moments():
    fixed = P.AdaptiveKL(0.05, None, 1000)
    fixed.update(10.0, 100)
    assert fixed.value == 0.05
    ctl = P.AdaptiveKL(0.05, 1.0, 1000)
    ctl.update(3.0, 100)                                           # error clipped to +0.2
    assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * 0.1))
    ctl.update(0.9, 100)
    assert ctl.value == pytest.approx(0.05 * 1.02 * (1 - 0.1 * 0.1))
    m = P.RunningMoments()
    data = [1.0, 2.0, 4.0, 8.0, -3.0, 0.5]
    m.update(data[:2])
    m.update(data[2:5])
    m.update(data[5:])
    assert m.mean == pytest.approx(np.mean(data)) and m.std == pytest.approx(np.std(data, ddof=1))


def test_step_queries_are_a_function_of_the_step_and_cover_the_split():
    qs = [{"id": i, "query": str(i)} for i in range(10)]
    first = [q["id"] for s in range(5) for q in P.step_queries(qs, s, 4, seed=1)]
    assert sorted(first[:10]) == list(range(10))                  # one pass covers every query once
    assert [q["id"] for q in P.step_queries(qs, 3, 4, seed=1)] == first[12:16]


# --------------------------------------------------------------------------- the policy on a tiny model
@pytest.fixture(scope="module")
def tiny_policy():
    from peft import get_peft_model
    from almost_utils.models import load_model
    from almost_utils.reward import decoder_layers, lora_config
    cfg = load_config(TINY, {"output_dir": "/tmp/unused"})
    spec = ModelSpec(source="tiny:packaged:gemma-3-270m", tiny=TinySpec())
    lm, tok = load_model(spec, "cpu", seed=0)
    plain, _ = load_model(spec, "cpu", seed=0)
    peft_model = get_peft_model(lm, lora_config(cfg.ppo, decoder_layers(lm), task="CAUSAL_LM", where="ppo",
                                                modules_to_save=None))
    torch.manual_seed(1)
    with torch.no_grad():                                          # a trained-looking adapter: B != 0
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    # the rollout copy's original weights are read once, before any sync (as the stage does)
    return P.PolicyValue(peft_model, temperature=0.7).eval(), plain.eval(), tok, P.RolloutWeights(plain, peft_model)


def _batch(tok, queries, responses):
    from almost_utils.sft import prompt_piece
    return P.pad_batch([tok(prompt_piece(q)).input_ids for q in queries], responses, tok.pad_token_id, "cpu")


def _plain_logp(model, batch, temperature):
    """log softmax(logits / T) of the response tokens with the model's own full forward."""
    out = []
    logits = model(input_ids=batch["ids"], attention_mask=batch["attn"]).logits.float() / temperature
    lp = torch.log_softmax(logits, -1)
    for b in range(len(batch["ids"])):
        n, p = int(batch["resp_mask"][b].sum()), int(batch["prompt_lens"][b])
        out.append([lp[b, p - 1 + t, batch["ids"][b, p + t]].item() for t in range(n)])
    return out


def test_disabled_adapter_is_the_reference_and_the_rollout_copy_is_the_policy(tiny_policy):
    policy, plain, tok, weights = tiny_policy
    batch = _batch(tok, ["How do I bake bread?", "Name a colour."], [[5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        logp, entropy, values = policy(batch["ids"], batch["attn"], batch["prompt_lens"], batch["resp_mask"])
        with policy.peft.disable_adapter():
            ref, _, _ = policy(batch["ids"], batch["attn"], batch["prompt_lens"], batch["resp_mask"])
        base = _plain_logp(plain, batch, 0.7)                          # the untouched base = the reference
    for b, row in enumerate(base):
        assert ref[b, :len(row)].tolist() == pytest.approx(row, abs=1e-4)
    assert not torch.allclose(logp, ref)                               # the adapter changes the policy
    assert (values == 0).all() and (entropy > 0).sum() == 6

    weights.sync()                                                     # plain copy = W0 + BA
    with torch.no_grad():
        synced = _plain_logp(plain, batch, 0.7)
    for b, row in enumerate(synced):
        assert logp[b, :len(row)].tolist() == pytest.approx(row, abs=1e-4)


def test_engine_samples_from_the_policy_it_is_synced_to(tiny_policy):
    """Greedy engine tokens on the synced copy are, step by step, the argmax of the policy's
    log-probs computed by a plain forward of the adapted model; sampled tokens have finite log-probs."""
    from almost_utils.sampling import SamplingParams, TransformersEngine
    from almost_utils.sft import prompt_piece
    policy, plain, tok, weights = tiny_policy
    weights.sync()
    weights.sync()                                                     # idempotent: W0 + BA, not W0 + 2 BA
    engine = TransformersEngine(plain, tok, batch_size=4, progress=False)
    queries = ["How do I bake bread?", "Name a colour.", "Why is the sea salty?"]
    greedy = engine.generate_tokens([prompt_piece(q) for q in queries],
                                    SamplingParams(max_new_tokens=6, temperature=0.0, include_eos=True))
    batch = _batch(tok, queries, greedy)
    with torch.no_grad():
        hidden = policy.lm.model(input_ids=batch["ids"], attention_mask=batch["attn"]).last_hidden_state
        logits = policy.lm.get_output_embeddings()(hidden)
    for b, toks in enumerate(greedy):
        p = int(batch["prompt_lens"][b])
        assert [int(logits[b, p - 1 + t].argmax()) for t in range(len(toks))] == toks
    sampled = engine.generate_tokens([prompt_piece(q) for q in queries],
                                     SamplingParams(max_new_tokens=6, temperature=0.7, seed=5, include_eos=True))
    batch = _batch(tok, queries, sampled)
    with torch.no_grad():
        logp, _, _ = policy(batch["ids"], batch["attn"], batch["prompt_lens"], batch["resp_mask"])
    assert torch.isfinite(logp).all() and (logp[batch["resp_mask"].bool()] > -15).all()


def test_ppo_raises_a_programmatic_reward():
    """Reward one token's presence: the first answer token must be the one the initial policy
    samples most often after a fixed prompt. A random tiny model is near uniform over 262k tokens,
    so its output layer is sharpened (x16) until a handful of tokens carry the mass; the target
    starts with a minority share of the samples and PPO must make it the usual answer."""
    from collections import Counter
    from peft import get_peft_model
    from almost_utils.models import load_model
    from almost_utils.reward import decoder_layers, lora_config
    from almost_utils.sampling import SamplingParams, TransformersEngine
    from almost_utils.sft import prompt_piece
    cfg = load_config(TINY, {"output_dir": "/tmp/unused", "ppo.learning_rate": 1e-4, "ppo.rollout_batch": 8,
                             "ppo.minibatch": 4, "ppo.ppo_epochs": 4, "ppo.kl_coef": 0.0, "ppo.max_new_tokens": 1,
                             "ppo.temperature": 1.0, "splits.sizes.ppo": 8})
    spec = ModelSpec(source="tiny:packaged:gemma-3-270m", tiny=TinySpec())
    lm, tok = load_model(spec, "cpu", seed=0)
    plain, _ = load_model(spec, "cpu", seed=0)
    with torch.no_grad():
        for m in (lm, plain):
            m.get_output_embeddings().weight.mul_(16.0)                # tied: the input embeddings scale too
    engine = TransformersEngine(plain, tok, batch_size=8, progress=False)
    probe = engine.generate_tokens([prompt_piece("Hi there")] * 64, SamplingParams(max_new_tokens=1, seed=11))
    target, count = Counter(t[0] for t in probe if t).most_common(1)[0]
    target_text = tok.decode([target], skip_special_tokens=True).strip()
    assert target_text and count < 40                                  # a minority share: room to learn
    torch.manual_seed(0)
    peft_model = get_peft_model(lm, lora_config(cfg.ppo, decoder_layers(lm), task="CAUSAL_LM", where="ppo",
                                                modules_to_save=None))
    policy = P.PolicyValue(peft_model, cfg.ppo.temperature).eval()
    reward = lambda queries, texts: [float(t == target_text) for t in texts]    # noqa: E731
    trainer = P.PPOTrainer(cfg.ppo, policy, tok, engine, P.RolloutWeights(plain, peft_model), reward, seed=0)
    queries = [{"id": i, "query": "Hi there"} for i in range(8)]
    rows = [trainer.step(queries) for _ in range(16)]
    first = np.mean([r["rm_score"] for r in rows[:3]])
    last = np.mean([r["rm_score"] for r in rows[-4:]])
    assert last >= 0.6 and last > first + 0.3, [round(r["rm_score"], 3) for r in rows]
    assert all(math.isfinite(r["pg_loss"]) for r in rows) and rows[-1]["step"] == 16


# --------------------------------------------------------------------------- bad input
def test_bad_fields_and_missing_inputs_stop_before_a_model_loads(tmp_path, monkeypatch):
    import almost_utils.sft as sft

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(sft, "load_policy", refuse)
    for field, value, message in (("ppo.kl_coef", -0.1, r"ppo.kl_coef: must be >= 0"),
                                  ("ppo.clip_range", 1.5, r"ppo.clip_range: must be in \(0, 1\)"),
                                  ("ppo.minibatch", 8, r"ppo.minibatch: 8 is larger than ppo.rollout_batch = 4"),
                                  ("ppo.start_from", "vanilla", r"ppo.start_from: an SFT stage"),
                                  ("ppo.temperature", 0, r"ppo.temperature: must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY, {"output_dir": str(tmp_path / "x"), field: value})
    cfg = load_config(TINY, {"output_dir": str(tmp_path / "run")})
    claim_upstream(cfg, ("queries", "comparisons", "reward_model", "splits", "rmsp"))
    with pytest.raises(ConfigError, match=r"ppo.start_from: the SFT policy .*sft/adapter is missing or unfinished"):
        P.run_ppo_stage(cfg, progress=False)
