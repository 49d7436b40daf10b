"""The per-step token diagnostic (common/tracking.py token_diagnostics) against a loop over tokens."""

import math

import numpy as np
import pytest
import torch

from common.tracking import PROB_BUCKETS, token_diagnostics


def by_hand(logp, adv, mask):
    """The same quantities, one token at a time."""
    tokens = [(math.exp(logp[i][t]), adv[i][t] if isinstance(adv[i], list) else adv[i], logp[i][t])
              for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    n, mass = len(tokens), sum(abs(a) for _, a, _ in tokens)
    out = {}
    for low, high in PROB_BUCKETS:
        name = "p<0.1" if low == 0 else "p>0.9" if high == 1 else f"p{low}-{high}"
        inside = [(p, a) for p, a, _ in tokens if low <= p and (p < high or high == 1)]
        for sign, keep in (("pos", lambda a: a > 0), ("neg", lambda a: a < 0)):
            chosen = [a for _, a in inside if keep(a)]
            out[f"tokens/share/{name}/{sign}"] = len(chosen) / n
            out[f"tokens/mass/{name}/{sign}"] = sum(abs(a) for a in chosen) / mass
    mean_lp, mean_a = np.mean([lp for _, _, lp in tokens]), np.mean([a for _, a, _ in tokens])
    out["tokens/cov_logp_adv"] = float(np.mean([(lp - mean_lp) * (a - mean_a) for _, a, lp in tokens]))
    return out


@pytest.mark.parametrize("per_token", [False, True])
def test_token_diagnostics_match_a_loop_over_tokens(per_token):
    g = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(6, 5, generator=g).clamp(min=1e-3)).double()
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    adv = torch.randn(6, 5, generator=g).double() if per_token else torch.randn(6, generator=g).double()
    got = token_diagnostics(logp, adv, mask)
    want = by_hand(logp.tolist(), adv.tolist(), mask.tolist())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # every token with A != 0 is in one bucket: shares and masses each add up to 1
    assert sum(v for k, v in got.items() if "/share/" in k) == pytest.approx(1.0)
    assert sum(v for k, v in got.items() if "/mass/" in k) == pytest.approx(1.0)


def test_covariance_sign_says_which_tokens_are_pushed_up():
    """Confident tokens with positive advantages (and unlikely ones with negative): Cov > 0, entropy falls."""
    logp = torch.log(torch.tensor([[0.95, 0.9], [0.05, 0.1]]))
    mask = torch.ones(2, 2)
    assert token_diagnostics(logp, torch.tensor([1.0, -1.0]), mask)["tokens/cov_logp_adv"] > 0
    assert token_diagnostics(logp, torch.tensor([-1.0, 1.0]), mask)["tokens/cov_logp_adv"] < 0


@pytest.mark.parametrize("script", ["grpo", "reinforce", "ppo", "sft_rl_mixed"])
def test_every_rl_script_logs_the_same_token_diagnostic(script, sft_run, tmp_path, monkeypatch):
    import importlib

    from common.tracking import read_metrics

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    module.main(module.parse_args(["--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4",
                                   "--no-tensorboard", "--num-eval-prompts", "2", "--num-eval-samples", "1",
                                   "--eval-every", "0", "--run-name", "diag"]))
    step = [r for r in read_metrics("runs/diag") if "event" not in r][0]
    keys = set(token_diagnostics(torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1)))
    assert keys <= set(step), sorted(keys - set(step))
    assert sum(step[k] for k in keys if "/share/" in k) <= 1 + 1e-6
