"""Tests of the sampling engine on a tiny random gemma-3 (2 layers, sliding window 16).

The tiny model borrows gemma-3-270m's tokenizer (the converted folder under data/models);
nothing else is needed. Prefixes are longer than the sliding window and prompts differ in
length, so both the window and the padding matter to every exactness check.
"""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from almost_utils.config import ModelSpec, TinySpec
from almost_utils.models import load_model
from almost_utils.sampling import (SamplingParams, TransformersEngine, _use_packed, cut_at_stop, nucleus,
                                   pack_linears)

PREFIX = ("The following is a conversation between a curious human and a helpful, honest assistant. "
          "The assistant answers briefly and accurately, and says so when it does not know.\n\n-----\n\n"
          "Human: What is the boiling point of water at sea level?\n\nAssistant: 100 degrees Celsius.\n\n-----")
PROMPTS = [
    "\n\nHuman: hi\n\nAssistant:",
    "\n\nHuman: What is the capital of France, and why did it become the capital?\n\nAssistant:",
    "\n\nHuman: Tell me a long story about dragons and knights in a castle far away from here.\n\nAssistant:",
    "\n\nHuman: 2+2?\n\nAssistant:",
    "\n\nHuman: How do I keep houseplants alive on vacation?\n\nAssistant:",
]
NEW = 12


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model(ModelSpec(source="tiny:packaged:gemma-3-270m", tiny=TinySpec()), "cpu", seed=0)
    return model, tok


def greedy(n=NEW, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def hf_one_at_a_time(model, tok, prefix, prompts, n=NEW):
    """Plain ``model.generate``, greedy, one prompt at a time (ids joined like the engine)."""
    outs = []
    for p in prompts:
        ids = tok(prefix).input_ids + tok(p, add_special_tokens=False).input_ids if prefix else tok(p).input_ids
        ids = torch.tensor([ids])
        o = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=tok.pad_token_id)
        outs.append(o[0, ids.shape[1]:].tolist())
    return outs


# --------------------------------------------------------------------------- exactness
def test_setup_exercises_window_and_padding(tiny):
    """The checks below are only meaningful if the window and padding are in play."""
    model, tok = tiny
    window = model.config.sliding_window
    n_prefix = len(tok(PREFIX).input_ids)
    lengths = {len(tok(p, add_special_tokens=False).input_ids) for p in PROMPTS}
    assert n_prefix > 2 * window and len(lengths) > 2
    # The reference itself changes when the window is removed: a window bug cannot pass unseen.
    ref = hf_one_at_a_time(model, tok, PREFIX, PROMPTS[:3])
    model.config.sliding_window = 10_000
    try:
        unwindowed = hf_one_at_a_time(model, tok, PREFIX, PROMPTS[:3])
    finally:
        model.config.sliding_window = window
    assert ref != unwindowed


def test_greedy_matches_hf_with_and_without_prefix_cache(tiny):
    model, tok = tiny
    ref = hf_one_at_a_time(model, tok, PREFIX, PROMPTS)
    cached = TransformersEngine(model, tok, batch_size=3, progress=False)
    uncached = TransformersEngine(model, tok, batch_size=3, progress=False, prefix_cache=False)
    assert cached.generate_tokens(PROMPTS, greedy(), PREFIX) == ref
    assert uncached.generate_tokens(PROMPTS, greedy(), PREFIX) == ref
    assert cached.generate_tokens(PROMPTS, greedy(), PREFIX) == ref          # memoised prefix
    assert model.config._attn_implementation == "sdpa"                        # restored after use


def test_greedy_matches_hf_without_prefix(tiny):
    model, tok = tiny
    ref = hf_one_at_a_time(model, tok, "", PROMPTS)
    engine = TransformersEngine(model, tok, batch_size=4, progress=False)
    assert engine.generate_tokens(PROMPTS, greedy(), prefix="") == ref


def test_long_generation_crosses_window(tiny):
    """Generated tokens alone outgrow the window: the per-row sliding mask is exercised too."""
    model, tok = tiny
    ref = hf_one_at_a_time(model, tok, PREFIX, PROMPTS[:2], n=40)
    engine = TransformersEngine(model, tok, batch_size=2, progress=False)
    assert engine.generate_tokens(PROMPTS[:2], greedy(40), PREFIX) == ref


def test_empty_prompt_with_prefix(tiny):
    model, tok = tiny
    ref = hf_one_at_a_time(model, tok, PREFIX, ["", PROMPTS[0]])
    engine = TransformersEngine(model, tok, batch_size=2, progress=False)
    assert engine.generate_tokens(["", PROMPTS[0]], greedy(), PREFIX) == ref


def test_outputs_follow_input_order(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=2, progress=False)
    batched = engine.generate(PROMPTS, greedy(), PREFIX)
    single = [engine.generate([p], greedy(), PREFIX)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)   # distinct outputs, so a permutation would show


def test_repeated_prompts_share_one_prefill_and_match_hf(tiny):
    """Self-play asks for N samples of each prompt: identical rows of a batch are prefilled once
    and copied. Greedy, every copy must equal one-at-a-time generate; sampled, the copies differ
    and the rows of the other prompts are unaffected by which batch they share."""
    model, tok = tiny
    asked = [PROMPTS[1]] * 3 + [PROMPTS[2]] * 3 + [PROMPTS[0]]
    ref = hf_one_at_a_time(model, tok, PREFIX, asked)
    engine = TransformersEngine(model, tok, batch_size=4, progress=False)
    assert engine.generate_tokens(asked, greedy(), PREFIX) == ref
    sampled = engine.generate_tokens([PROMPTS[1]] * 4, SamplingParams(max_new_tokens=NEW, temperature=1.0,
                                                                     ignore_eos=True, seed=3), PREFIX)
    assert len({tuple(t) for t in sampled}) > 1


def test_empty_prompt_list(tiny):
    model, tok = tiny
    assert TransformersEngine(model, tok, progress=False).generate([], greedy(), PREFIX) == []


def test_prefix_cache_follows_weight_changes(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=4, progress=False)
    before = engine.generate_tokens(PROMPTS[:3], greedy(), PREFIX)
    w = model.model.layers[0].self_attn.v_proj.weight   # (k_proj would be undone by k_norm)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        after = engine.generate_tokens(PROMPTS[:3], greedy(), PREFIX)
        assert after == hf_one_at_a_time(model, tok, PREFIX, PROMPTS[:3])
        assert after != before
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_packed_siblings_match_separate_linears_in_any_call_order():
    """q/k/v share one packed product; every call order still gives each module its own output."""
    torch.manual_seed(0)
    block = torch.nn.Module()
    for name, out in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4)):
        setattr(block, name, torch.nn.Linear(6, out, bias=name == "k_proj"))
    forwards = pack_linears(block)
    assert set(forwards) == {block.q_proj, block.k_proj, block.v_proj}   # the pinned CPU torch has oneDNN
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    want = {n: getattr(block, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
    with torch.inference_mode(), _use_packed(forwards):
        for order in (["q_proj", "k_proj", "v_proj"], ["v_proj", "q_proj", "q_proj", "k_proj"]):
            for n in order:
                torch.testing.assert_close(getattr(block, n)(x), want[n])
        torch.testing.assert_close(block.k_proj(y), torch.nn.functional.linear(y, block.k_proj.weight,
                                                                                block.k_proj.bias))
    assert "forward" not in vars(block.q_proj)   # restored after use


# --------------------------------------------------------------------------- stopping
def test_cut_at_stop():
    assert cut_at_stop("abc\nHuman: x", ["\nHuman:"]) == ("abc", True)
    assert cut_at_stop("a\n-----b\nHuman:", ["\nHuman:", "\n-----"]) == ("a", True)   # earliest wins
    assert cut_at_stop("no stop here", ["\nHuman:"]) == ("no stop here", False)
    assert cut_at_stop("x\nHuman:", []) == ("x\nHuman:", False)
    assert cut_at_stop("x\nHuman:", [""]) == ("x\nHuman:", False)                   # empty stop ignored
    assert cut_at_stop("\nHuman:", ["\nHuman:"]) == ("", True)


def test_stop_strings_cut_and_end_rows(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=3, progress=False)
    full_ids = engine.generate_tokens(PROMPTS[:3], greedy(30), PREFIX)
    full = [tok.decode(t, skip_special_tokens=True) for t in full_ids]
    # A stop string spanning the boundary between two tokens of one output: caught only if the
    # check looks further back than the newest token.
    cut = len(tok.decode(full_ids[1][:6], skip_special_tokens=True))
    stop = full[1][cut - 2:cut + 2]
    assert full[1].find(stop) == cut - 2
    texts = engine.generate(PROMPTS[:3], greedy(30, stop=[stop, "\nHuman:"]), PREFIX)
    assert texts == [cut_at_stop(f, [stop, "\nHuman:"])[0] for f in full]
    assert stop not in texts[1] and len(texts[1]) < len(full[1])
    # The row that hit the stop string stopped generating soon after.
    ids = engine.generate_tokens(PROMPTS[:3], greedy(30, stop=[stop]), PREFIX)
    assert len(ids[1]) < 30 and stop in tok.decode(ids[1]) and stop not in tok.decode(ids[1][:-1])


def test_eos_ends_a_row(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=3, progress=False)
    full = engine.generate_tokens(PROMPTS[:3], greedy(), PREFIX)
    eos = full[0][5]
    engine.eos = {eos}
    ended = engine.generate_tokens(PROMPTS[:3], SamplingParams(max_new_tokens=NEW, temperature=0.0), PREFIX)
    for f, e in zip(full, ended):
        assert e == (f[:f.index(eos)] if eos in f else f)


# --------------------------------------------------------------------------- randomness
def test_sampling_is_deterministic_per_seed(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=2, progress=False)
    p = lambda seed: SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)
    a = engine.generate_tokens(PROMPTS, p(0), PREFIX)
    torch.manual_seed(123)                       # global RNG must not matter
    b = engine.generate_tokens(PROMPTS, p(0), PREFIX)
    c = engine.generate_tokens(PROMPTS, p(1), PREFIX)
    assert a == b
    assert a != c
    assert a != engine.generate_tokens(PROMPTS, greedy(), PREFIX)   # it did sample


def reference_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Full-vocabulary top-p by a full sort: the probability vector to sample from."""
    probs = torch.softmax(logits, dim=-1)
    si = logits.argsort(dim=-1, descending=True)      # by logit: probabilities may round into ties
    sp = probs.gather(-1, si)
    before = sp.cumsum(-1) - sp
    sp = sp.masked_fill(before >= top_p, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, si, sp)
    return out / out.sum(-1, keepdim=True)


def nucleus_dense(logits: torch.Tensor, top_p: float, first_cut: float) -> torch.Tensor:
    probs, ids = nucleus(logits, top_p, first_cut)
    out = torch.zeros_like(logits).scatter_add_(-1, ids, probs)   # padding: id 0 with probability 0
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("scale", [0.01, 1.0, 4.0, 30.0])   # flat ... very peaked
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("first_cut", [0.05, 1.0, 8.0])   # small cuts exercise the fallback
def test_top_k_then_top_p_equals_full_top_p(scale, top_p, first_cut):
    g = torch.Generator().manual_seed(int(scale * 100) + int(top_p * 1000) + int(first_cut * 10))
    logits = torch.randn(6, 5000, generator=g) * scale
    logits[0] = logits[0].sort(descending=True).values   # sorted, and one row with a huge winner
    logits[1, 17] += 50.0
    ours = nucleus_dense(logits, top_p, first_cut)
    assert torch.allclose(ours, reference_top_p(logits, top_p), atol=1e-6, rtol=1e-5)
    assert torch.equal(ours > 0, reference_top_p(logits, top_p) > 0)   # the same nucleus
    hf = torch.softmax(TopPLogitsWarper(top_p)(None, logits.clone()), dim=-1)
    assert torch.allclose(ours, hf, atol=1e-6, rtol=1e-5)


def test_nucleus_falls_back_when_first_guess_is_short():
    logits = torch.randn(3, 3000, generator=torch.Generator().manual_seed(0)) * 0.01   # nearly uniform
    logits[2] *= 300                                                                      # and one peaked row
    probs, ids = nucleus(logits, 0.9, first_cut=0.001)   # the first guess holds a token or two
    assert ((probs[:2] > 0).sum(-1) > 2500).all()
    assert torch.allclose(nucleus_dense(logits, 0.9, 0.001), reference_top_p(logits, 0.9), atol=1e-7)


# --------------------------------------------------------------------------- scoring through the engine
def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of every position of one unpadded row, by a plain forward: ``[len, V]``."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_next_token_logprobs_match_a_plain_forward(tiny, with_prefix):
    """Left padding behind a shared prefix (longer than the window) changes nothing."""
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=3, progress=False)
    prefix = tok(PREFIX).input_ids if with_prefix else []
    rows = [tok(p, add_special_tokens=not with_prefix).input_ids for p in PROMPTS]
    cands = [tok(" A", add_special_tokens=False).input_ids[0], tok(" B", add_special_tokens=False).input_ids[0]]
    got = engine.next_token_logprobs(rows, cands, prefix)
    assert got.shape == (len(PROMPTS), 2)
    for i, r in enumerate(rows):
        want = plain_logprobs(model, prefix + r)[-1, cands]
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_continuation_logprobs_match_a_plain_forward(tiny, with_prefix):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=2, progress=False)
    prefix = tok(PREFIX).input_ids if with_prefix else []
    rows = [tok(p, add_special_tokens=not with_prefix).input_ids for p in PROMPTS]
    conts = [tok(c, add_special_tokens=False).input_ids
             for c in [" yes", " It became the capital long ago.", "", " Once upon a time", " Water them."]]
    got = engine.continuation_logprobs(rows, conts, prefix)
    for r, c, g in zip(rows, conts, got):
        lp = plain_logprobs(model, prefix + r + c)
        want = [float(lp[len(prefix) + len(r) - 1 + j, t]) for j, t in enumerate(c)]
        assert g == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="continuations"):
        engine.continuation_logprobs(rows, conts[:2], prefix)


def test_generate_ids_equals_generate_tokens(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=4, progress=False)
    want = engine.generate_tokens(PROMPTS, greedy(), prefix=PREFIX)
    rows = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    assert engine.generate_ids(rows, greedy(), tok(PREFIX).input_ids) == want
