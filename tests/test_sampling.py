"""Speculative sampling keeps the model's own sampling distribution (chi-square against the exact one)."""

import torch
from scipy.stats import chisquare

import selfspec
from selfspec.sampling import Sampler

SAMPLES = 300
TOP_K, TEMPERATURE = 4, 1.3


def exact_pair_distribution(model, ids: torch.Tensor) -> dict[tuple[int, int], float]:
    """P(t1, t2) under the warped distribution model.generate samples from."""
    sampler = Sampler(True, temperature=TEMPERATURE, top_k=TOP_K)
    with torch.no_grad():
        p1 = sampler.probs(model(ids).logits[0, -1:])[0]
        firsts = p1.nonzero().flatten().tolist()
        batch = torch.cat([ids.repeat(len(firsts), 1), torch.tensor(firsts)[:, None]], dim=1)
        p2 = sampler.probs(model(batch).logits[:, -1])
    return {(a, b): float(p1[a] * p2[i, b]) for i, a in enumerate(firsts) for b in p2[i].nonzero().flatten().tolist()}


def p_value(pairs: list[tuple[int, int]], exact: dict[tuple[int, int], float]) -> float:
    keys = sorted(exact, key=exact.get, reverse=True)
    common = [k for k in keys if exact[k] * SAMPLES >= 5]  # chi-square wants expected counts >= 5
    observed = [sum(p == k for p in pairs) for k in common]
    expected = [exact[k] * SAMPLES for k in common]
    observed.append(SAMPLES - sum(observed))
    expected.append(SAMPLES - sum(expected))
    return chisquare(observed, expected).pvalue


def test_speculative_sampling_matches_model_distribution(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("The best thing about the ocean is", return_tensors="pt")["input_ids"]
    exact = exact_pair_distribution(model, ids)
    # Width 1 with no floor: each sample drafts one token (accepted or resampled) and then takes a bonus.
    fast = selfspec.wrap(model, selfspec.Schedule(exit_layer=24, max_draft=1))
    kwargs = dict(max_new_tokens=2, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=1.0)
    torch.manual_seed(0)
    ours = fast.generate(ids.repeat(SAMPLES, 1), **kwargs)[:, -2:]
    torch.manual_seed(0)
    theirs = model.generate(ids.repeat(SAMPLES, 1), **kwargs)[:, -2:]
    ours_p = p_value([tuple(r) for r in ours.tolist()], exact)
    theirs_p = p_value([tuple(r) for r in theirs.tolist()], exact)
    print(f"chi-square p-value: selfspec {ours_p:.3f}, model.generate {theirs_p:.3f}")
    assert fast.last_stats.drafted == SAMPLES and 0 < fast.last_stats.accepted < SAMPLES  # both branches taken
    assert theirs_p > 1e-3, "the exact distribution must describe model.generate's own sampling"
    assert ours_p > 1e-3


def test_sampling_with_a_draft_that_rejects_everything_still_matches(smollm2_fp32):
    """A very shallow draft is mostly rejected, so nearly every token comes from the residual distribution."""
    model, tokenizer = smollm2_fp32
    ids = tokenizer("My favourite colour is", return_tensors="pt")["input_ids"]
    exact = exact_pair_distribution(model, ids)
    fast = selfspec.wrap(model, selfspec.Schedule(exit_layer=2, max_draft=1))
    torch.manual_seed(1)
    out = fast.generate(ids.repeat(SAMPLES, 1), max_new_tokens=2, do_sample=True, temperature=TEMPERATURE, top_k=TOP_K)
    assert p_value([tuple(r) for r in out[:, -2:].tolist()], exact) > 1e-3
    assert fast.last_stats.accepted < fast.last_stats.drafted


def test_greedy_stays_exact_when_sampling_settings_are_present(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, temperature=0.7, top_p=0.9)
    out = selfspec.wrap(model, selfspec.Schedule(exit_layer=20)).generate(
        ids, max_new_tokens=12, do_sample=False, temperature=0.7, top_p=0.9
    )
    assert torch.equal(out, expected)
