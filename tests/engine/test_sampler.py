"""The sampler on exact logits: what each filter keeps, the draw's frequencies, and rows sampled
together against rows sampled alone. Statistical checks use thousands of draws with bounds several
standard deviations wide, and a fixed seed, so they do not flake."""
from __future__ import annotations

import math

import pytest
import torch

from worker.engine.request import Request, Sequence
from worker.engine.sampler import TOP_P_CANDIDATES, Sampler, seed_generator
from worker.engine.sampling_params import SamplingParams

EOS = 0


def seq(params: SamplingParams, seed_index: int | None = None) -> Sequence:
    request = Request(request_id="r", prompt=None, prompt_token_ids=[1, 2, 3], params=params)
    generator = seed_generator(params.seed, seed_index or 0, "cpu") if params.seed is not None else None
    return Sequence(request=request, index=0, token_ids=[1, 2, 3], detok=None, generator=generator)


def draw(logits: list[float], params: SamplingParams, n: int, sampler: Sampler | None = None) -> list[int]:
    """n samples of one distribution, as n rows of one batch."""
    sampler = sampler or Sampler({EOS}, seed=7, device="cpu")
    rows = torch.tensor([logits], dtype=torch.float32).repeat(n, 1)
    samples = [(seq(params), 0) for _ in range(n)]
    return [token for token, _ in sampler(rows, samples, list(range(n)))]


def frequencies(tokens: list[int], vocab: int) -> list[float]:
    return [tokens.count(t) / len(tokens) for t in range(vocab)]


def close(observed: list[float], expected: list[float], n: int) -> bool:
    # 5 standard deviations of a frequency from n draws, per token
    return all(abs(o - e) <= 5 * math.sqrt(max(e * (1 - e), 1e-4) / n) for o, e in zip(observed, expected))


LOGITS = [0.0, 2.0, 1.5, 1.0, -1.0, 0.5]   # token 0 is EOS: min_tokens tests ban it


def softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    return torch.softmax(torch.tensor(logits) / temperature, dim=0).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_batch_draws_follow_the_tempered_softmax(temperature):
    n = 6000
    tokens = draw(LOGITS, SamplingParams(temperature=temperature, max_tokens=4), n)
    assert close(frequencies(tokens, len(LOGITS)), softmax(LOGITS, temperature), n)


def test_top_k_keeps_the_k_most_likely_in_proportion():
    n = 6000
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, top_k=2, max_tokens=4), n)
    assert set(tokens) == {1, 2}
    p1, p2 = softmax([2.0, 1.5])
    assert close(frequencies(tokens, len(LOGITS)), [0, p1, p2, 0, 0, 0], n)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    probs = [0.05, 0.5, 0.3, 0.1, 0.05]   # sorted: 0.5, 0.3 (crosses 0.7), then the rest dropped
    logits = torch.tensor(probs).log().tolist()
    n = 6000
    tokens = draw(logits, SamplingParams(temperature=1.0, top_p=0.7, max_tokens=4), n)
    assert set(tokens) == {1, 2}
    assert close(frequencies(tokens, len(probs)), [0, 0.5 / 0.8, 0.3 / 0.8, 0, 0], n)


@pytest.mark.parametrize("spread", ["narrow", "wide"])
def test_top_p_over_a_large_vocabulary(spread):
    """Narrow: the top-p set lies inside the first TOP_P_CANDIDATES tokens; wide: it does not, and
    the row is sorted whole. Either way exactly the top-p set is drawn from."""
    vocab = 4 * TOP_P_CANDIDATES
    slope = 0.05 if spread == "narrow" else 0.0005
    logits = [-slope * i for i in range(vocab)]   # token i is the i-th most likely
    probs = softmax(logits)
    running, keep = 0.0, 0
    while running < 0.6:
        running += probs[keep]
        keep += 1
    assert (keep <= TOP_P_CANDIDATES) == (spread == "narrow")
    tokens = draw(logits, SamplingParams(temperature=1.0, top_p=0.6, max_tokens=4), 3000)
    assert max(tokens) < keep             # nothing outside the set
    assert max(tokens) >= 0.9 * (keep - 1)   # and the whole set drawn from, not a part of it


def test_min_p_drops_tokens_below_its_share_of_the_best():
    n = 4000
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, min_p=0.5, max_tokens=4), n)
    probs = softmax(LOGITS)
    allowed = {t for t, p in enumerate(probs) if p >= 0.5 * max(probs)}
    assert set(tokens) == allowed


def test_greedy_and_sampled_rows_in_one_batch():
    sampler = Sampler({EOS}, seed=3, device="cpu")
    rows = torch.tensor([LOGITS] * 400, dtype=torch.float32)
    greedy, sampled = SamplingParams(temperature=0, max_tokens=4), SamplingParams(temperature=1.0, max_tokens=4)
    samples = [(seq(greedy if i % 2 else sampled), 0) for i in range(400)]
    tokens = [t for t, _ in sampler(rows, samples, list(range(400)))]
    assert all(t == 1 for t in tokens[1::2])            # argmax
    assert len(set(tokens[0::2])) >= 4                 # drawn


def test_rows_alone_and_together_draw_the_same_distribution():
    """Rows that need their own treatment (a penalty, min_tokens, a seed) are sampled one by one,
    the rest together: both paths give the same tempered, filtered distribution."""
    n = 5000
    params = dict(temperature=0.8, top_k=4, max_tokens=8)
    together = draw(LOGITS, SamplingParams(**params), n)
    # a presence penalty sends a row down the per-row path; with nothing generated yet it changes nothing
    alone = draw(LOGITS, SamplingParams(**params, presence_penalty=0.5), n)
    expected = softmax([-math.inf, 2.0, 1.5, 1.0, -math.inf, 0.5], 0.8)
    for tokens in (together, alone):
        assert set(tokens) <= {1, 2, 3, 5}
        assert close(frequencies(tokens, len(LOGITS)), expected, n)


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=4)
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))

    def run(others: int) -> int:
        sampler = Sampler({EOS}, seed=others, device="cpu")
        rows = torch.cat([logits, torch.randn(others, 300)])
        samples = [(seq(params), 0)] + [(seq(SamplingParams(max_tokens=4)), 0) for _ in range(others)]
        return sampler(rows, samples, list(range(others + 1)))[0][0]

    assert len({run(k) for k in (0, 1, 5, 17)}) == 1


def test_min_tokens_bans_eos_until_reached():
    n = 500
    rows = torch.tensor([[10.0, 0.0, 0.0]] * n)   # EOS overwhelmingly likely
    sampler = Sampler({EOS}, seed=1, device="cpu")
    params = SamplingParams(temperature=1.0, min_tokens=2, max_tokens=4)
    tokens = [t for t, _ in sampler(rows.clone(), [(seq(params), 0) for _ in range(n)], list(range(n)))]
    assert EOS not in tokens


def test_each_row_of_a_mixed_batch_keeps_its_own_filters():
    """One batch, rows with different temperatures, top-k, top-p (within the candidates and past
    them) and min-p: each row draws only from its own allowed set."""
    vocab = 4 * TOP_P_CANDIDATES
    steep = [-0.05 * i for i in range(vocab)]      # top-p 0.6 set: ~18 tokens (within the candidates)
    flat = [-0.0005 * i for i in range(vocab)]     # top-p 0.6 set: hundreds (past them)
    kinds = [
        (steep, SamplingParams(temperature=1.0, top_k=2, max_tokens=4), lambda t: t < 2),
        (steep, SamplingParams(temperature=0.7, max_tokens=4), lambda t: True),
        (steep, SamplingParams(temperature=1.0, top_p=0.6, max_tokens=4), lambda t: t < 20),
        (flat, SamplingParams(temperature=1.0, top_p=0.6, max_tokens=4), lambda t: t < 0.7 * vocab),
        (steep, SamplingParams(temperature=1.0, min_p=0.5, max_tokens=4), lambda t: t <= 13),   # e^-0.05t >= 0.5
        (steep, SamplingParams(temperature=0, max_tokens=4), lambda t: t == 0),
    ]
    per_kind = 300
    rows = torch.tensor([logits for logits, _, _ in kinds for _ in range(per_kind)], dtype=torch.float32)
    samples = [(seq(params), 0) for _, params, _ in kinds for _ in range(per_kind)]
    tokens = [t for t, _ in Sampler({vocab + 1}, seed=5, device="cpu")(rows, samples, list(range(len(samples))))]
    for k, (_, _, allowed) in enumerate(kinds):
        drawn = tokens[k * per_kind:(k + 1) * per_kind]
        assert all(allowed(t) for t in drawn), (k, sorted(set(drawn))[-5:])
    assert max(tokens[per_kind:2 * per_kind]) > 20          # no filter: the tail is reached
    assert max(tokens[3 * per_kind:4 * per_kind]) > TOP_P_CANDIDATES   # the wide top-p set is drawn from


def test_nan_logits_fail_instead_of_drawing_a_token():
    rows = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        Sampler({EOS}, seed=1, device="cpu")(rows, [(seq(SamplingParams(max_tokens=4)), 0)], [0])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_min_tokens_in_a_batch_bans_each_rows_own_stops_only_until_reached(temperature):
    """min_tokens is applied to the whole batch at once: each row loses EOS and its own stop token
    ids while under its min_tokens, and nothing once past it; a stop id past the vocabulary is
    ignored, not an error for the step."""
    rows = torch.tensor([[10.0, 0.0, 9.0, 8.0]] * 4)   # EOS, then token 2, then 3, most likely
    sampler = Sampler({EOS}, seed=1, device="cpu")
    under = SamplingParams(temperature=temperature, min_tokens=2, max_tokens=4, stop_token_ids=[2, 10**6])
    plain_ban = SamplingParams(temperature=temperature, min_tokens=2, max_tokens=4)
    reached = seq(SamplingParams(temperature=temperature, min_tokens=1, max_tokens=4))
    reached.append(3)
    samples = [(seq(under), 0), (seq(plain_ban), 1), (reached, 2), (seq(SamplingParams(temperature=temperature,
                                                                                          max_tokens=4)), 3)]
    if temperature:
        draws = [[t for t, _ in sampler(rows.clone(), samples, [0, 1, 2, 3])] for _ in range(200)]
        assert {d[0] for d in draws} <= {1, 3} and 0 not in {d[1] for d in draws}
        assert 2 not in {d[0] for d in draws} and 2 in {d[1] for d in draws}
        assert 0 in {d[2] for d in draws} and 0 in {d[3] for d in draws}
    else:
        tokens = [t for t, _ in sampler(rows.clone(), samples, [0, 1, 2, 3])]
        assert tokens == [3, 2, 0, 0]


def test_min_tokens_bans_leave_a_shared_row_and_a_logprobs_row_alone():
    """Two samples drawing from one row (forks of an n > 1 request) where only one is under
    min_tokens, and a row asking for logprobs beside a banned row: the ban reaches only its own
    sample, and the logprobs are of the logits as the model gave them."""
    sampler = Sampler({EOS}, seed=1, device="cpu")
    logits = torch.tensor([[10.0, 0.0, 9.0], [10.0, 0.0, 9.0]])
    under = seq(SamplingParams(temperature=0, min_tokens=2, max_tokens=4))
    past = seq(SamplingParams(temperature=0, min_tokens=1, max_tokens=4))
    past.append(2)
    assert [t for t, _ in sampler(logits.clone(), [(under, 0), (past, 0)], [0, 0])] == [2, 0]
    wants_logprobs = seq(SamplingParams(temperature=0, max_tokens=4, logprobs=2))
    (banned, _), (token, logprobs) = sampler(logits.clone(), [(seq(SamplingParams(temperature=0, min_tokens=2,
                                                                                   max_tokens=4)), 0),
                                                               (wants_logprobs, 1)], [0, 1])
    assert banned == 2 and token == EOS
    assert EOS in logprobs and logprobs[EOS] == pytest.approx(float(torch.log_softmax(logits[1], -1)[EOS]))


def test_greedy_ids_are_argmax_with_ties_nan_and_infinities():
    from worker.engine.sampler import greedy_ids

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (12, 1000), generator=g).float()   # many ties for the maximum
    rows[1] = float("-inf")
    rows[2, [7, 500]] = float("nan")
    rows[3, :] = float("nan")
    rows[4, 999] = float("inf")
    rows[5, [3, 4]] = float("inf")
    rows[6, 995] = float("nan")                                          # past the last whole 16 columns
    rows[7, :] = 0.0
    rows[7, [2, 600]] = -0.0                                             # -0.0 and 0.0 tie
    assert greedy_ids(rows) == rows.argmax(dim=-1).tolist()
    assert greedy_ids(rows)[0] == int((rows[0] == rows[0].max()).nonzero()[0])   # the first maximum
    assert greedy_ids(rows[:, :333]) == rows[:, :333].argmax(dim=-1).tolist()   # rows 1,000 apart
    assert greedy_ids(rows, compiled=False) == rows.argmax(dim=-1).tolist()   # max() alone
