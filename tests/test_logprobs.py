"""common/logprobs.py and common/rollout.py against naive reference computations.

The reference for "log pi(y_t | x, y_<t)" is the most literal one: run the model on each
sequence alone, unpadded, with a plain forward pass (default positions, no mask), divide the
logits by T, log-softmax over the whole vocabulary and pick the token.
"""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config

from common.logprobs import (
    completion_logprobs,
    masked_mean,
    masked_sum,
    masked_var,
    batch_moments,
    position_ids_from_mask,
    selective_log_softmax,
)
from common.rollout import generate_hf
from common.rollout_data import completion_mask_from_ids

QUESTIONS = ["12+3", "what is 45+67? think", "9"]


def chat_prompt(tokenizer, question):
    """The chat-template prompt, written out by hand (ChatML) so it does not depend on common/tasks.py."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def right_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@torch.no_grad()
def naive_token_logprobs(model, prompt, completion, temperature):
    """(logprobs (C,), entropy (C,)) of `completion` after `prompt`: one unpadded sequence, plain forward."""
    seq = torch.tensor([prompt + completion])
    logits = model(input_ids=seq).logits[0].double()  # (P + C, V)
    logits = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / temperature  # (C, V)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp[torch.arange(len(completion)), torch.tensor(completion)]
    entropy = -(logp.exp() * logp).sum(-1)
    return picked, entropy


def example_batch(tokenizer):
    """Three (prompt, completion) pairs of different prompt and completion lengths, as id lists."""
    gen = torch.Generator().manual_seed(0)
    prompts = [ids_of(tokenizer, chat_prompt(tokenizer, q)) for q in QUESTIONS]
    lengths = [5, 1, 9]
    # completions: arbitrary ids, specials included (the model must score any token)
    completions = [torch.randint(0, len(tokenizer), (n,), generator=gen).tolist() for n in lengths]
    return prompts, completions


# ---------------------------------------------------------------------------------------
# completion_logprobs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_completion_logprobs_match_naive_per_sequence_forward(tiny_model, tokenizer, temperature):
    prompts, completions = example_batch(tokenizer)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = right_pad(completions, tokenizer.pad_token_id)
    assert len(set(map(len, prompts))) == len(prompts), "the batch must actually need padding"

    with torch.no_grad():
        logprobs, entropy = completion_logprobs(
            tiny_model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature, with_entropy=True
        )
    assert logprobs.shape == entropy.shape == completion_ids.shape
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ref_logprobs, ref_entropy = naive_token_logprobs(tiny_model, prompt, completion, temperature)
        n = len(completion)
        torch.testing.assert_close(logprobs[i, :n].double(), ref_logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[i, :n].double(), ref_entropy, atol=1e-5, rtol=0)


def test_completion_logprobs_temperature_changes_the_result(tiny_model, tokenizer):
    """Guards the test above against a model so flat that T would not matter."""
    prompts, completions = example_batch(tokenizer)
    a, _ = naive_token_logprobs(tiny_model, prompts[2], completions[2], 1.0)
    b, _ = naive_token_logprobs(tiny_model, prompts[2], completions[2], 0.7)
    assert (a - b).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_gpt2(tokenizer):
    """A tiny GPT-2: learned *absolute* position embeddings.

    Llama's rotary positions are relative: shifting every position of a sequence by the same
    amount (what left padding does when position ids ignore the mask) leaves q.k unchanged in
    exact arithmetic, so with Llama alone a wrong position id is invisible at fp32 tolerance.
    With absolute positions it changes every logprob.
    """
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_gpt2"])
def test_completion_logprobs_are_invariant_to_left_padding(model_name, tokenizer, request):
    model = request.getfixturevalue(model_name)
    short_prompt = ids_of(tokenizer, chat_prompt(tokenizer, "1+2"))
    long_prompt = ids_of(tokenizer, chat_prompt(tokenizer, "a much longer question: " + "7+8, " * 12))
    completion = ids_of(tokenizer, "3 is it") + [tokenizer.eos_token_id]
    other_completion = ids_of(tokenizer, "15")
    assert len(long_prompt) - len(short_prompt) > 40

    def logprobs_of_first_row(prompts, completions):
        p_ids, p_mask = left_pad(prompts, tokenizer.pad_token_id)
        c_ids, c_mask = right_pad(completions, tokenizer.pad_token_id)
        with torch.no_grad():
            lp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=1.0)
        return lp[0, : len(completions[0])]

    alone = logprobs_of_first_row([short_prompt], [completion])
    padded = logprobs_of_first_row([short_prompt, long_prompt], [completion, other_completion])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    # ... and both are the naive unpadded reference
    reference, _ = naive_token_logprobs(model, short_prompt, completion, 1.0)
    torch.testing.assert_close(alone.double(), reference, atol=1e-5, rtol=0)


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]])
    positions = position_ids_from_mask(mask)
    for row in range(mask.shape[0]):
        real = positions[row][mask[row].bool()].tolist()
        assert real == list(range(int(mask[row].sum())))


# ---------------------------------------------------------------------------------------
# selective_log_softmax
# ---------------------------------------------------------------------------------------


def random_logits_and_index(vocab=97, scale=6.0):
    gen = torch.Generator().manual_seed(1)
    logits = scale * torch.randn(3, 5, vocab, generator=gen)  # spread wide enough that logsumexp matters
    index = torch.randint(0, vocab, (3, 5), generator=gen)
    return logits, index


def test_selective_log_softmax_float32():
    logits, index = random_logits_and_index()
    expected = F.log_softmax(logits.double(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.shape == index.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_selective_log_softmax_bfloat16():
    logits, index = random_logits_and_index(scale=2.0)  # |z| < ~8: bf16 rounding < ~0.016 per logit
    logits_bf16 = logits.bfloat16()
    got = selective_log_softmax(logits_bf16, index)
    assert got.shape == index.shape
    # Loose: against the fp32 logits, the bf16 rounding of the inputs alone costs ~1e-2.
    expected_fp32 = F.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.float(), expected_fp32, atol=2e-2, rtol=0)
    # Tight: the docstring promises the reduction itself runs in fp32 on the bf16 values.
    expected_exact = F.log_softmax(logits_bf16.double(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), expected_exact, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# masked reductions
# ---------------------------------------------------------------------------------------


def random_masked():
    gen = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(4, 7, generator=gen, dtype=torch.float64) + 1.5
    mask = (torch.rand(4, 7, generator=gen) < 0.6).long()
    mask[3] = 0  # one empty row
    mask[0, :2] = 1
    return x, mask


def test_masked_sum_mean_var_match_numpy():
    x, mask = random_masked()
    selected = x.numpy()[mask.numpy().astype(bool)]
    assert 5 < selected.size < x.numel()
    np.testing.assert_allclose(masked_sum(x, mask).item(), selected.sum(), rtol=1e-12)
    np.testing.assert_allclose(masked_mean(x, mask).item(), selected.mean(), rtol=1e-12)
    np.testing.assert_allclose(masked_var(x, mask).item(), selected.var(ddof=1), rtol=1e-12)


def test_masked_sum_and_mean_along_a_dim_match_numpy():
    x, mask = random_masked()
    xs, ms = x.numpy(), mask.numpy().astype(bool)
    expected_sums = np.array([xs[i][ms[i]].sum() for i in range(len(xs))])
    expected_means = np.array([xs[i][ms[i]].mean() if ms[i].any() else 0.0 for i in range(len(xs))])
    np.testing.assert_allclose(masked_sum(x, mask, dim=1).numpy(), expected_sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(masked_mean(x, mask, dim=1).numpy(), expected_means, rtol=1e-12, atol=1e-12)


def test_batch_moments_match_numpy_on_valid_positions():
    x, mask = random_masked()
    selected = x.numpy()[mask.numpy().astype(bool)]
    mean, var = batch_moments(x, mask)
    np.testing.assert_allclose(mean.item(), selected.mean(), rtol=1e-10)
    np.testing.assert_allclose(var.item(), selected.var(ddof=1), rtol=1e-10)


@pytest.mark.parametrize("script", ["ppo", "reinforce"])
def test_masked_whiten_matches_numpy_on_valid_positions(script):
    masked_whiten = importlib.import_module(script).masked_whiten
    x, mask = random_masked()
    m = mask.numpy().astype(bool)
    selected = x.numpy()[m]
    mean, var = selected.mean(), selected.var(ddof=1)
    expected = (selected - mean) / np.sqrt(var + 1e-8)
    np.testing.assert_allclose(masked_whiten(x, mask).numpy()[m], expected, rtol=1e-10)
    # shift_mean=False: unit variance, the original mean kept (TRL's convention).
    np.testing.assert_allclose(masked_whiten(x, mask, shift_mean=False).numpy()[m], expected + mean, rtol=1e-10)


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    x = torch.randn(3, 4)
    mask = torch.zeros(3, 4)
    assert masked_mean(x, mask).item() == 0.0
    assert torch.equal(masked_mean(x, mask, dim=1), torch.zeros(3))


# ---------------------------------------------------------------------------------------
# generate_hf and completion_mask_from_ids
# ---------------------------------------------------------------------------------------


def noisy_eos_ids(tokenizer):
    """The real EOS plus a dozen frequent characters, so an untrained model stops mid-sequence."""
    return [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(list("0123456789+= "))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_hf_sampler_logprobs_match_trainer_and_masks_are_right(tiny_model, tokenizer, temperature):
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS]
    eos_ids = noisy_eos_ids(tokenizer)
    n, max_new_tokens = 3, 10
    torch.manual_seed(0)
    r = generate_hf(
        tiny_model, tokenizer, prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, eos_ids=eos_ids
    )
    B = len(prompts) * n
    assert r.completion_ids.shape[0] == B and r.completion_mask.shape == r.completion_ids.shape
    assert r.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    for row in range(B):  # grouped by prompt: rows i*n .. i*n+n-1 hold prompt i
        expected_prompt = ids_of(tokenizer, prompts[row // n])
        real = r.prompt_ids[row][r.prompt_mask[row].bool()].tolist()
        assert real == expected_prompt

    # completion_mask: 1 up to and including the first EOS, 0 after; is_eos says whether there was one.
    C = r.completion_ids.shape[1]
    assert r.is_eos.any() and (~r.is_eos).any(), "the test needs both stopped and truncated rows"
    for row in range(B):
        ids, mask = r.completion_ids[row].tolist(), r.completion_mask[row].tolist()
        length = sum(mask)
        assert mask == [1] * length + [0] * (C - length)
        valid = ids[:length]
        eos_positions = [t for t, tok in enumerate(valid) if tok in eos_ids]
        if r.is_eos[row]:
            assert eos_positions == [length - 1]
        else:
            assert eos_positions == [] and length == max_new_tokens
        assert ids[length:] == [tokenizer.pad_token_id] * (C - length)
        assert r.completions[row] == tokenizer.decode(valid, skip_special_tokens=True)

    # sampler logprobs == trainer logprobs at the same T, on valid tokens.
    with torch.no_grad():
        trainer, _ = completion_logprobs(
            tiny_model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, temperature=temperature
        )
    valid = r.completion_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], trainer[valid], atol=1e-4, rtol=0)
    # ... and both equal the naive per-sequence reference.
    for row in range(B):
        length = int(r.completion_mask[row].sum())
        prompt = ids_of(tokenizer, prompts[row // n])
        ref, _ = naive_token_logprobs(tiny_model, prompt, r.completion_ids[row, :length].tolist(), temperature)
        torch.testing.assert_close(r.sampler_logprobs[row, :length].double(), ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_generate_hf_samples_from_the_full_vocabulary(tiny_model, tokenizer):
    """transformers defaults to top_k=50; generate_hf must turn it off, or the sampler's
    distribution is not softmax(z / T) and the recorded logprobs are wrong."""
    prompts = [chat_prompt(tokenizer, q) for q in ["1+1", "22+33", "x", "99+1"]]
    torch.manual_seed(0)
    r = generate_hf(tiny_model, tokenizer, prompts, n=4, temperature=1.0, max_new_tokens=8)
    ranks = []
    for row in range(r.completion_ids.shape[0]):
        prompt = ids_of(tokenizer, prompts[row // 4])
        completion = r.completion_ids[row, : int(r.completion_mask[row].sum())].tolist()
        logits = tiny_model(input_ids=torch.tensor([prompt + completion])).logits[0]
        logits = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]  # (C, V)
        picked = logits[torch.arange(len(completion)), torch.tensor(completion)]
        ranks += (logits > picked[:, None]).sum(-1).tolist()  # 0 = most likely token
    assert len(ranks) >= 100
    assert max(ranks) >= 50


def test_generate_hf_greedy_is_deterministic_and_is_the_argmax(tiny_model, tokenizer):
    prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS[:2]]
    torch.manual_seed(0)
    a = generate_hf(tiny_model, tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=8)
    torch.manual_seed(123)
    b = generate_hf(tiny_model, tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])  # same prompt, greedy: same completion
    # greedy == step-by-step argmax of the unpadded model (the first prompt is the shorter one: padded)
    seq = ids_of(tokenizer, prompts[0])
    expected = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(tiny_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            expected.append(nxt)
            seq.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    assert a.completion_ids[0, : len(expected)].tolist() == expected


@pytest.mark.parametrize(
    "row, eos_ids, expected_mask, expected_is_eos",
    [
        ([3, 5, 6, 7], [3], [1, 0, 0, 0], True),  # EOS first
        ([5, 6, 3, 7], [3], [1, 1, 1, 0], True),  # EOS in the middle
        ([5, 6, 7, 3], [3], [1, 1, 1, 1], True),  # EOS last
        ([5, 6, 7, 8], [3], [1, 1, 1, 1], False),  # no EOS: truncated
        ([5, 9, 3, 9], [3, 9], [1, 1, 0, 0], True),  # two EOS ids: the first of either
        ([5, 3, 9, 3], [9, 3], [1, 1, 0, 0], True),
        ([5, 6, 3, 3], [3], [1, 1, 1, 0], True),  # repeated EOS
    ],
)
def test_completion_mask_from_ids_single_rows(row, eos_ids, expected_mask, expected_is_eos):
    mask, is_eos = completion_mask_from_ids(torch.tensor([row]), eos_ids)
    assert mask.tolist() == [expected_mask]
    assert is_eos.tolist() == [expected_is_eos]


def test_completion_mask_from_ids_batch():
    ids = torch.tensor([[3, 5, 6, 7], [5, 6, 3, 7], [5, 6, 7, 8], [5, 9, 3, 9]])
    mask, is_eos = completion_mask_from_ids(ids, [3, 9])
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert is_eos.tolist() == [True, True, False, True]


@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_grouped_prompts_give_the_same_logprobs_entropy_and_gradient(tokenizer, max_new_tokens):
    """group_size=G runs each shared prompt once; values and gradients must equal the plain path."""
    from common.models import build_tiny_model
    from common.rollout import generate_hf
    from common.tasks import format_prompt

    model = build_tiny_model(tokenizer, seed=3)
    prompts = [format_prompt(tokenizer, q) for q in ("1+2", "45+67", "9", "100+200")]  # unequal lengths
    torch.manual_seed(0)
    r = generate_hf(model, tokenizer, prompts, n=3, temperature=1.0, max_new_tokens=max_new_tokens)
    batch = (r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7, True)
    valid = r.completion_mask.bool()
    grads = []
    for group_size in (1, 3):
        model.zero_grad()
        logp, entropy = completion_logprobs(model, *batch, group_size=group_size)
        (logp * r.completion_mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if group_size == 1:
            ref_logp, ref_entropy = logp.detach(), entropy.detach()
    assert torch.allclose(logp.detach()[valid], ref_logp[valid], atol=5e-5)
    assert torch.allclose(entropy.detach()[valid], ref_entropy[valid], atol=5e-5)
    for a, b in zip(*grads):  # fp32 summation order differs: compare relative to the gradient's size
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-8
