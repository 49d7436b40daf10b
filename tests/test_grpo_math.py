"""grpo.py's math, each function against an independent re-computation written here."""

import math
import statistics

import pytest
import torch

from grpo import (
    PRESETS,
    Args,
    aggregate_loss,
    cispo_loss,
    clip_cov_mask,
    compute_advantages,
    gspo_log_ratio,
    kl_cov_mask,
    kl_penalty,
    mismatch_weights,
    parse_args,
    policy_token_loss,
    sapo_loss,
    top_entropy_mask,
)


def clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip_c=0.0):
    """grpo.policy_token_loss on given ratios (logp_old = 0, logp = log r), the plain clipped path."""
    args = Args(eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
    logp = torch.log(ratio) if not ratio.requires_grad else ratio
    return policy_token_loss(logp, torch.zeros_like(logp), adv, torch.ones_like(logp), args)


def test_advantages_every_scaling_mode():
    rewards = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.2, 0.9, 0.4, 0.4, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]]
    all_values = [r for group in rewards for r in group]
    batch_std = statistics.stdev(all_values)
    eps = 1e-4
    got = {mode: compute_advantages(torch.tensor(rewards), mode, eps) for mode in ("group", "batch", "none")}
    for g, group in enumerate(rewards):
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert got["group"][g, i].item() == pytest.approx((r - mean) / (std + eps), abs=1e-5)
            assert got["batch"][g, i].item() == pytest.approx((r - mean) / (batch_std + eps), abs=1e-5)
            assert got["none"][g, i].item() == pytest.approx(r - mean, abs=1e-6)
    assert torch.all(got["group"][2] == 0)  # a zero-std group has no signal, not NaN


def _per_sequence_reference(token_loss, mask, mode, max_new_tokens):
    seqs = []
    for row, m in zip(token_loss.tolist(), mask.tolist()):
        seqs.append([v for v, keep in zip(row, m) if keep])
    if mode == "token-mean":
        return sum(sum(s) for s in seqs) / sum(len(s) for s in seqs)
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in seqs) / len(seqs)
    return sum(sum(s) for s in seqs) / (len(seqs) * max_new_tokens)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregation_modes_and_micro_batch_sum(mode):
    torch.manual_seed(0)
    token_loss = torch.randn(6, 7)
    lengths = [1, 7, 3, 5, 2, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    num_tokens = int(mask.sum())
    full = aggregate_loss(token_loss, mask, mode, 6, num_tokens, 7)
    assert full.item() == pytest.approx(_per_sequence_reference(token_loss, mask, mode, 7), abs=1e-6)
    # micro-batches of 2 with the minibatch's normalisers sum to the same number
    parts = sum(aggregate_loss(token_loss[i : i + 2], mask[i : i + 2], mode, 6, num_tokens, 7) for i in (0, 2, 4))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_clipped_surrogate_clip_higher_and_dual_clip():
    ratios = [0.5, 0.79, 0.81, 1.0, 1.19, 1.27, 1.29, 3.0, 10.0]
    for adv in (-2.0, -0.5, 0.7, 1.5):
        r = torch.tensor(ratios)
        a = torch.full_like(r, adv)
        loss, low, high = clipped_surrogate(r, a, 0.2, 0.28)
        loss_dual, _, _ = clipped_surrogate(r, a, 0.2, 0.28, dual_clip_c=3.0)
        for i, ratio in enumerate(ratios):
            clipped_ratio = min(max(ratio, 0.8), 1.28)
            ppo = -min(ratio * adv, clipped_ratio * adv)
            assert loss[i].item() == pytest.approx(ppo, abs=1e-6)
            dual = min(ppo, -3.0 * adv) if adv < 0 else ppo
            assert loss_dual[i].item() == pytest.approx(dual, abs=1e-6)
            assert bool(low[i]) == (ratio < 0.8 and adv < 0)
            assert bool(high[i]) == (ratio > 1.28 and adv > 0)


def test_clip_removes_gradient_only_beyond_the_range():
    logp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    logp_old = torch.tensor([0.0, -0.5, 0.5])  # ratios 1, e^0.5 = 1.65, e^-0.5 = 0.61
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, _, _ = policy_token_loss(logp, logp_old, adv, torch.ones(3), Args(eps_low=0.2, eps_high=0.2))
    loss.sum().backward()
    assert logp.grad[0].item() == pytest.approx(-1.0)  # d(-r A)/dlogp = -r A at r = 1
    assert logp.grad[1].item() == 0.0  # r > 1 + eps with A > 0: clipped
    assert logp.grad[2].item() == 0.0  # r < 1 - eps with A < 0: clipped


def test_kl_estimators_formulas_and_unbiasedness():
    logp = torch.tensor([-0.1, -2.0, -0.7])
    logp_ref = torch.tensor([-0.3, -1.0, -0.7])
    for i in range(3):
        d = logp_ref[i].item() - logp[i].item()
        assert kl_penalty(logp, logp_ref, "k1")[i].item() == pytest.approx(-d, abs=1e-6)
        assert kl_penalty(logp, logp_ref, "k2")[i].item() == pytest.approx(0.5 * d * d, abs=1e-6)
        assert kl_penalty(logp, logp_ref, "k3")[i].item() == pytest.approx(math.exp(d) - d - 1, abs=1e-6)
    # Monte Carlo: with y ~ p, mean k1 and mean k3 estimate KL(p || q) exactly computed here.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    y = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[y], q.log()[y]
    for est in ("k1", "k3"):
        assert kl_penalty(lp, lq, est).mean().item() == pytest.approx(exact, rel=0.03)
    assert (kl_penalty(lp, lq, "k3") >= 0).all()


def test_gspo_token_form_matches_sequence_objective_value_and_gradient():
    torch.manual_seed(1)
    B, C = 4, 6
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (C - n) for n in lengths])
    logp_old = -torch.rand(B, C)
    logp0 = logp_old + 0.3 * torch.randn(B, C) * 1e-3  # within GSPO's tiny clip range for some rows
    logp0[1] = logp_old[1] + 0.01  # this sequence's ratio is clipped
    adv = torch.tensor([1.0, 1.0, -0.5, -1.0])
    args = Args(importance_level="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.0)

    logp = logp0.clone().requires_grad_(True)
    token_loss, _, _ = policy_token_loss(logp, logp_old, adv.unsqueeze(-1), mask, args)
    ratio = torch.exp(gspo_log_ratio(logp, logp_old, mask)).detach()
    loss = aggregate_loss(token_loss, mask, "seq-mean-token-mean", B, int(mask.sum()), C)
    loss.backward()

    # Sequence objective written directly: s_i = exp(mean_t (logp - logp_old)), clipped like PPO.
    logp_ref = logp0.clone().requires_grad_(True)
    per_seq = []
    for i in range(B):
        n = lengths[i]
        s = torch.exp((logp_ref[i, :n] - logp_old[i, :n]).mean())
        per_seq.append(torch.maximum(-s * adv[i], -torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * adv[i]))
        # value: every valid token carries the sequence ratio
        assert torch.allclose(ratio[i, :n], s.detach().expand(n), atol=1e-6)
    seq_loss = torch.stack(per_seq).mean()
    seq_loss.backward()
    assert loss.item() == pytest.approx(seq_loss.item(), abs=1e-6)
    assert torch.allclose(logp.grad, logp_ref.grad, atol=1e-6)
    assert logp.grad[1].abs().sum() == 0  # the clipped sequence gets no gradient


def test_cispo_gradient_flows_through_clipped_tokens():
    logp = torch.tensor([-1.0, -1.0], requires_grad=True)
    logp_old = torch.tensor([-1.0, -3.0])  # ratios 1 and e^2 = 7.39 (above the cap 1 + 5 = 6)
    adv = torch.tensor([2.0, 2.0])
    loss, clipped = cispo_loss(torch.exp(logp - logp_old), logp, adv, 5.0)
    loss.sum().backward()
    assert clipped.tolist() == [False, True]
    # d/dlogp of -sg(w) A logp = -w A, with w = min(r, 6)
    assert logp.grad.tolist() == pytest.approx([-1.0 * 2.0, -6.0 * 2.0])
    # PPO's clip would have zeroed the second token's gradient
    ppo, _, _ = policy_token_loss(logp, logp_old, adv, torch.ones(2), Args())
    logp.grad = None
    ppo.sum().backward()
    assert logp.grad[1].item() == 0.0


def _covariances(adv, logp, mask):
    valid = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    mean_a = sum(adv[i, t].item() for i, t in valid) / len(valid)
    mean_l = sum(logp[i, t].item() for i, t in valid) / len(valid)
    return {(i, t): (adv[i, t].item() - mean_a) * (logp[i, t].item() - mean_l) for i, t in valid}


def test_clip_cov_cuts_only_candidates_in_bounds():
    torch.manual_seed(2)
    B, C = 8, 50
    adv = (torch.randn(B, 1) * 3).expand(B, C).contiguous()
    logp = -torch.rand(B, C) * 6
    mask = (torch.rand(B, C) > 0.2).float()
    cov = _covariances(adv, logp, mask)
    candidates = {k for k, v in cov.items() if 1.0 < v < 5.0}
    for ratio in (2e-4, 0.01, 0.05):
        keep = clip_cov_mask(adv, logp, mask, torch.zeros(B, C, dtype=torch.bool), ratio, (1.0, 5.0))
        cut = {(i, t) for i in range(B) for t in range(C) if keep[i, t] == 0}
        expected = min(len(candidates), max(1, math.floor(ratio * int(mask.sum()))))
        assert len(cut) == expected
        assert cut <= candidates
    # already-clipped tokens are never candidates
    clipped = torch.ones(B, C, dtype=torch.bool)
    assert clip_cov_mask(adv, logp, mask, clipped, 0.05, (1.0, 5.0)).min() == 1


def test_kl_cov_selects_the_top_covariance_tokens():
    torch.manual_seed(3)
    B, C = 6, 40
    adv = torch.randn(B, 1).expand(B, C).contiguous()
    logp = -torch.rand(B, C) * 4
    mask = (torch.rand(B, C) > 0.3).float()
    cov = _covariances(adv, logp, mask)
    for ratio in (2e-3, 0.1):
        k = max(1, math.floor(ratio * int(mask.sum())))
        expected = set(sorted(cov, key=cov.get, reverse=True)[:k])
        chosen = kl_cov_mask(adv, logp, mask, ratio)
        assert {(i, t) for i in range(B) for t in range(C) if chosen[i, t]} == expected


def test_top_entropy_mask_keeps_ceil_rho_n_highest():
    torch.manual_seed(4)
    entropy = torch.rand(5, 9)
    mask = (torch.rand(5, 9) > 0.4).float()
    n = int(mask.sum())
    for rho in (0.2, 0.5, 0.01, 1.0):
        keep = top_entropy_mask(entropy, mask, rho)
        assert int(keep.sum()) == math.ceil(rho * n)
        assert (keep <= mask).all()
        kept = [entropy[i, t].item() for i in range(5) for t in range(9) if keep[i, t]]
        dropped = [entropy[i, t].item() for i in range(5) for t in range(9) if mask[i, t] and not keep[i, t]]
        assert not dropped or min(kept) >= max(dropped)


@pytest.mark.parametrize("mode", ["tis", "icepop", "seq_mask", "seq_mask_geo"])
def test_mismatch_corrections_reduce_to_plain_grpo_when_sampler_agrees(mode):
    torch.manual_seed(5)
    logp_old = -torch.rand(4, 5)
    mask = torch.ones(4, 5)
    assert torch.allclose(mismatch_weights(logp_old, logp_old.clone(), mask, Args(mismatch_correction=mode)),
                          torch.ones(4, 5))


def test_tis_and_icepop_weights_against_an_independent_computation():
    """TIS: min(k, C). IcePop: k itself inside [alpha, beta], 0 outside (IcePop; TRL's token_mask)."""
    logp_old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.1]])
    logp_rollout = logp_old - torch.tensor([[0.0, 1.0, -1.0, 3.0, -3.0, 0.4]])  # log k_t
    mask = torch.ones_like(logp_old)
    tis = mismatch_weights(logp_old, logp_rollout, mask, Args(mismatch_correction="tis", tis_cap=2.0))
    ice = mismatch_weights(logp_old, logp_rollout, mask, Args(mismatch_correction="icepop", icepop_bounds=(0.5, 5.0)))
    for j, log_k in enumerate([0.0, 1.0, -1.0, 3.0, -3.0, 0.4]):
        k = math.exp(log_k)
        assert tis[0, j].item() == pytest.approx(min(k, 2.0), rel=1e-5)
        assert ice[0, j].item() == pytest.approx(k if 0.5 <= k <= 5.0 else 0.0, rel=1e-5)
    assert ice[0, 1].item() == pytest.approx(math.e, rel=1e-5)  # kept tokens carry k, not 1


def test_sequence_masked_is_weights_whole_completions():
    """seq_mask: k_i = prod_t k_t over valid tokens; every token of completion i gets k_i if
    alpha <= k_i <= beta, else 0. seq_mask_geo: k_i = exp(mean_t log k_t)."""
    torch.manual_seed(6)
    B, C = 5, 7
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (C - n) for n in lengths])
    logp_old = -torch.rand(B, C) * 3
    log_k = torch.randn(B, C) * 0.4
    log_k[2, 0] = 2.0  # a one-token completion with k = e^2 = 7.4: masked by the upper bound 3
    # padding: sampler logprobs are 0 there, the trainer's are arbitrary
    logp_rollout = torch.where(mask.bool(), logp_old - log_k, torch.zeros_like(log_k))
    for mode, bounds in (("seq_mask", (0.0, 3.0)), ("seq_mask_geo", (0.9, 1.1))):
        w = mismatch_weights(logp_old, logp_rollout, mask, Args(mismatch_correction=mode, seq_mask_bounds=bounds))
        for i, n in enumerate(lengths):
            logs = [log_k[i, t].item() for t in range(n)]
            k = math.exp(sum(logs)) if mode == "seq_mask" else math.exp(sum(logs) / n)
            expected = k if bounds[0] <= k <= bounds[1] else 0.0
            assert w[i, :n].tolist() == pytest.approx([expected] * n, rel=1e-5), (mode, i)
    assert mismatch_weights(logp_old, logp_rollout, mask, Args(mismatch_correction="seq_mask"))[2].sum() == 0


def test_sapo_gate_value_and_gradient():
    """SAPO: l = -(4 / tau) sigmoid(tau (r - 1)) A, tau by the sign of A; at r = 1 the gradient
    equals the unclipped surrogate's (-A), and it fades smoothly (never exactly 0) away from 1."""
    log_r = torch.tensor([0.0, 0.0, 0.5, -0.5, 2.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    loss = sapo_loss(torch.exp(log_r), adv, 1.0, 1.05)
    loss.sum().backward()
    for j in range(6):
        r, a = math.exp(log_r[j].item()), adv[j].item()
        tau = 1.0 if a > 0 else 1.05
        sig = 1 / (1 + math.exp(-tau * (r - 1)))
        assert loss[j].item() == pytest.approx(-(4 / tau) * sig * a, rel=1e-5)
        # d l / d log r = -A * 4 sig (1 - sig) * r  (chain rule through r = exp(log r))
        assert log_r.grad[j].item() == pytest.approx(-a * 4 * sig * (1 - sig) * r, rel=1e-4)
    assert log_r.grad[0].item() == pytest.approx(-1.0) and log_r.grad[1].item() == pytest.approx(1.0)
    assert (log_r.grad[2:].abs() > 0).all()  # a hard clip would give exactly 0 at r = 1.65 (A > 0)
    # and through policy_token_loss with --policy-loss sapo
    logp = torch.tensor([[0.5]], requires_grad=True)
    via_args, _, _ = policy_token_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                                       Args(policy_loss="sapo"))
    assert via_args.item() == pytest.approx(sapo_loss(torch.tensor(math.exp(0.5)), torch.tensor(1.0), 1.0, 1.05).item())


def test_every_preset_is_in_the_docstring_and_sets_what_it_says():
    import grpo

    for name, overrides in PRESETS.items():
        args = parse_args(["--preset", name])
        assert args.preset == name
        for key, value in overrides.items():
            if key != "overlong_cache_len":  # -1 = "a quarter of the budget", resolved in main
                assert getattr(args, key) == value, (name, key)
        if name != "grpo":
            line = next(line for line in grpo.__doc__.splitlines() if f"--preset {name} " in line)
            flags = line + next(iter(grpo.__doc__.split(line)[1].splitlines()[1:2]), "")
            for key, value in overrides.items():
                flag = "--" + key.replace("_", "-")
                assert flag in flags, (name, flag)
                if not isinstance(value, bool) and key != "overlong_cache_len":
                    shown = f"{value:g}" if isinstance(value, float) else str(value)
                    assert f"{flag} {shown}" in flags, (name, flag, value)


def test_presets_set_their_recipe_and_explicit_flags_win():
    dapo = parse_args(["--preset", "dapo"])
    assert (dapo.eps_high, dapo.beta, dapo.loss_agg, dapo.dynamic_sampling) == (0.28, 0.0, "token-mean", True)
    assert parse_args(["--preset", "dapo", "--eps-high", "0.3"]).eps_high == 0.3
    dr = parse_args(["--preset=dr_grpo"])
    assert (dr.scale_rewards, dr.loss_agg) == ("none", "seq-mean-token-sum-norm")
    assert parse_args([]).loss_agg == "seq-mean-token-mean" and parse_args([]).beta == 0.04
    with pytest.raises(SystemExit, match="--preset"):
        parse_args(["--preset", "nonsense"])


def test_grpo_gradient_does_not_depend_on_left_padding():
    """A group's loss gradient is the same alone (no padding) and left-padded next to a longer prompt."""
    from common.logprobs import completion_logprobs
    from common.models import build_char_tokenizer, build_tiny_model
    from common.tasks import encode_demonstrations, format_prompt

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=1)
    short, long = format_prompt(tokenizer, "1+2"), format_prompt(tokenizer, "12345+67890+13579")
    completions = ["3", "4", "13", "2"]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(-1)
    args = Args(beta=0.0)

    def group_gradient(prompts, rows):
        p_ids, p_mask, c_ids, c_mask = encode_demonstrations(tokenizer, prompts, completions * (len(prompts) // 4),
                                                             tokenizer.eos_token_id, 8)
        model.zero_grad()
        logp, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        logp, mask = logp[rows], c_mask[rows].float()
        token_loss, _, _ = policy_token_loss(logp, logp.detach(), adv, mask, args)
        aggregate_loss(token_loss, mask, "token-mean", 4, int(mask.sum()), 8).backward()
        return [p.grad.clone() for p in model.parameters()]

    alone = group_gradient([short] * 4, slice(0, 4))
    padded = group_gradient([short] * 4 + [long] * 4, slice(0, 4))  # the short prompts are now left-padded
    for a, b in zip(alone, padded):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-8
