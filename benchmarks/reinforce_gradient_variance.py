"""What a baseline is for, measured: the variance of reinforce.py's policy gradient per baseline.

A fixed batch of prompts, sampled again and again (`--trials` rollouts of num_prompts x G);
for each rollout and each baseline, the gradient of reinforce.py's loss (no clipping) at the
same weights. Per baseline we report, over the trials,
    var    = E ||g - E g||^2           the total variance (trace of the covariance)
    signal = ||E g||^2                 the squared norm of the mean gradient (minus var / trials, unbiased)
    noise/signal = var / signal        scale-free: REINFORCE++ whitens, so its g has another scale
All baselines see the same samples (common random numbers), so the differences are the baselines'.
The EMA baseline runs over the trials as in training (decay --ema-decay, from 0); the first
--warmup trials only advance it. REINFORCE++ is scored with the model as its own reference
(the SFT checkpoint *is* the reference at step 0), so its k1 is 0 and it is the globally whitened R.

Run:  python benchmarks/reinforce_gradient_variance.py --model runs/sft --trials 32
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.models import eos_token_ids, load_model_and_tokenizer  # noqa: E402
from common.rollout import HFEngine, generate_and_score  # noqa: E402
from common.tasks import load_task  # noqa: E402
from reinforce import aggregate_loss, compute_advantages, policy_token_loss, reinforce_pp_advantages  # noqa: E402
from common.logprobs import rollout_logprobs  # noqa: E402

BASELINES = ("none", "ema", "group", "rloo", "reinforce++")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/sft")
    parser.add_argument("--task", default="add_noisy")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--ema-decay", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    task = load_task(args.task)
    model, tokenizer = load_model_and_tokenizer(args.model, "cpu", torch.float32)
    engine = HFEngine(model, tokenizer, eos_token_ids(model, tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    G, ema = args.group_size, 0.0
    sums = {b: torch.zeros(sum(p.numel() for p in params), dtype=torch.float64) for b in BASELINES}
    squares = {b: 0.0 for b in BASELINES}
    rewards, start = [], time.process_time()
    for trial in range(args.warmup + args.trials):
        rollout = generate_and_score(engine, tokenizer, task, 0, args.num_prompts, args.seed, G, 1.0,
                                     task.max_new_tokens)  # position 0: the same prompts every trial
        if trial < args.warmup:
            ema = args.ema_decay * ema + (1 - args.ema_decay) * rollout.rewards.mean().item()
            continue
        rewards.append(rollout.rewards.mean().item())
        mask = rollout.completion_mask.float()
        logp, _ = rollout_logprobs(model, rollout, group_size=G)  # (B, C), with grad
        for baseline in BASELINES:
            advantages = compute_advantages(rollout.rewards, baseline, G, ema).unsqueeze(-1)
            if baseline == "reinforce++":
                advantages = reinforce_pp_advantages(advantages.squeeze(-1), torch.zeros_like(mask), mask, 0.0)
            loss = aggregate_loss(policy_token_loss(logp, advantages, mask), mask, "seq-mean-token-mean",
                                  len(rollout), int(mask.sum()), task.max_new_tokens)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            g = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten().double()
                           for x, p in zip(grads, params)])
            sums[baseline] += g
            squares[baseline] += float(g @ g)
        ema = args.ema_decay * ema + (1 - args.ema_decay) * rollout.rewards.mean().item()
    n = args.trials
    print(f"{args.model}, {args.task}: {args.num_prompts} prompts x G={G}, {n} trials "
          f"(mean reward {sum(rewards) / n:.3f}), {time.process_time() - start:.0f} CPU-s\n")
    print("| baseline | var = E‖g − Eg‖² | signal = ‖Eg‖² | noise/signal | vs none |")
    print("|---|---|---|---|---|")
    ratios = {}
    for b in BASELINES:
        mean = sums[b] / n
        var = (squares[b] / n - float(mean @ mean)) * n / (n - 1)  # unbiased
        signal = float(mean @ mean) - var / n  # ||mean||^2 overestimates ||E g||^2 by var / n
        ratios[b] = var / signal
        print(f"| {b} | {var:.4g} | {signal:.4g} | {ratios[b]:.3g} | {ratios[b] / ratios['none']:.2f}x |")


if __name__ == "__main__":
    main()
