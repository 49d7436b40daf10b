"""Logging: `runs/<run_name>/metrics.jsonl` always, TensorBoard by default, wandb with --track.

metrics.jsonl is the contract every script keeps (plots, docs and checks read it):
one JSON object per optimizer step, `{"step": int, "loss": float, ...}`, and after training
one `{"event": "eval", "step": int, "accuracy": ..., "pass@1": ..., "pass@2": ...,
"pass@4": ..., "pass@8": ...}` record.
"""

import json
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict

from common import distributed


def _jsonable(value):
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null says "undefined" honestly
    return value


class RunLogger:
    """Writes each step's metrics to metrics.jsonl, TensorBoard and (optionally) wandb.

    Under torchrun every rank calls `log` with its own metrics; they are averaged over ranks
    (`mean_over_ranks`) and rank 0 alone writes."""

    def __init__(self, run_dir: str, args, script: str, resume_step: int | None = None):
        """args: the script's Args (written to args.json with the script's name, printed as a table);
        resume_step: the step a resumed run restarts from (later records are dropped)."""
        config = {"script": script, **asdict(args)}
        tensorboard, wandb_project = args.tensorboard, args.wandb_project if args.track else None
        if distributed.rank() == 0:
            print_config(config)
        self.writes = distributed.rank() == 0
        self.tb = self.wandb = None
        if not self.writes:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            # Steps after the checkpoint will be redone: drop their records so each step appears once.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step
                        and json.loads(line).get("event") != "eval"]
        with open(self.path, "w") as f:
            f.writelines(kept)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
            self.tb.add_text("args", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                sys.exit("error: --track needs wandb: pip install wandb (or drop --track).")
            self.wandb = wandb.init(project=wandb_project, name=os.path.basename(run_dir), config=config,
                                    dir=run_dir, resume="allow")

    def log(self, step: int, metrics: dict):
        metrics = mean_over_ranks({k: _jsonable(v) for k, v in metrics.items()})  # a collective under torchrun
        if not self.writes:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if self.tb is not None and isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def mean_over_ranks(metrics: dict) -> dict:
    """Each numeric metric averaged over ranks (rates such as gen_tokens_per_s are then per rank);
    a `reasons/` count one rank never saw counts 0 there. The identity under plain python."""
    per_rank = distributed.all_gather_object(metrics)
    if len(per_rank) == 1:
        return metrics
    out = {}
    for key in dict.fromkeys(k for m in per_rank for k in m):  # every key, in first-seen order
        values = [m.get(key, 0 if key.startswith("reasons/") else None) for m in per_rank]
        if all(v == values[0] for v in values):
            out[key] = values[0]  # the same everywhere (eval results, counters): kept as it is
            continue
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[key] = sum(numbers) / len(numbers) if numbers and len(numbers) == len(values) else per_rank[0].get(key)
    return out


def read_metrics(run_dir: str) -> list[dict]:
    """All records of a run's metrics.jsonl (steps and the eval record)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def print_config(config: dict):
    width = max(len(k) for k in config)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in config.items()))


@contextmanager
def timed(times: dict, key: str):
    """Add the seconds spent in the `with` block to times[key] (the step-time split: generate, score, ...)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[key] = times.get(key, 0.0) + time.perf_counter() - start


class StepStats:
    """Diagnostics of one step, gathered over its micro-batches and optimizer steps.

    `tokens(mask, name=tensor, ...)` accumulates masked sums, so each name ends up as the mean
    over all valid tokens of the step (not a mean of micro-batch means, which would weight a
    short micro-batch as much as a long one). `values(name=float)` averages plain numbers
    (loss, grad_norm); `maxes(name=float)` keeps the largest.
    """

    def __init__(self):
        self.sums, self.counts, self.largest = defaultdict(float), defaultdict(float), {}

    def tokens(self, mask, **tensors):
        count = float(mask.sum())
        for name, tensor in tensors.items():
            if tensor is not None:
                self.sums[name] += float((tensor.detach().float() * mask).sum())
                self.counts[name] += count

    def values(self, **numbers):
        for name, number in numbers.items():
            self.sums[name] += float(number)
            self.counts[name] += 1

    def maxes(self, **numbers):
        for name, number in numbers.items():
            self.largest[name] = max(self.largest.get(name, -math.inf), float(number))

    def summary(self) -> dict:
        means = {name: self.sums[name] / self.counts[name] if self.counts[name] else math.nan for name in self.sums}
        return {**means, **self.largest}


def frac_zero_std_groups(rewards, group_size: int) -> float | None:
    """Share of groups whose rewards are all equal (their group-relative advantage is 0); None for G = 1."""
    if group_size == 1:
        return None
    return (rewards.view(-1, group_size).std(dim=1, correction=0) == 0).float().mean().item()


def rollout_metrics(trained, sampled, times: dict, num_epochs: int = 1, group_size: int | None = None) -> dict:
    """Length, truncation, throughput and the step-time split of one step, the same keys in every script:
    trained = the rows the update used, sampled = every row generated (they differ under DAPO's filter).
    With group_size G > 1 also the share of trained groups whose rewards are all equal (null for G = 1)."""
    train_tokens = int(trained.prompt_mask.sum() + trained.completion_mask.sum()) * num_epochs
    zero_std = frac_zero_std_groups(trained.rewards, group_size) if group_size else None
    return {"completion_length": trained.completion_lengths.float().mean().item(),
            "frac_zero_std_groups_trained": zero_std,
            "frac_truncated": 1 - trained.is_eos.float().mean().item(),
            "gen_tokens_per_s": int(sampled.policy_mask.sum()) / max(times["gen"], 1e-9),
            "train_tokens_per_s": train_tokens / max(times["train"], 1e-9),
            **{f"{k}_time": v for k, v in times.items()}}


PROB_BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 1.0))
"""Sampling-probability buckets of the token diagnostic: rare, uncertain, likely, near-certain tokens."""


def token_diagnostics(sampler_logprobs, advantages, mask) -> dict:
    """Which tokens the loss promotes or suppresses (the rl与sft survey: "analyse the rollout distribution
    before adding a trick"), the same `tokens/` keys in every RL script:

      tokens/share/<bucket>/<sign>  share of the step's completion tokens with sampling probability in the
                                    bucket (p<0.1, p0.1-0.5, p0.5-0.9, p>0.9) and advantage A > 0 ("pos") or < 0
      tokens/mass/<bucket>/<sign>   share of the step's |A| they carry (where the gradient's weight sits)
      tokens/cov_logp_adv           Cov(log pi, A) over the tokens (Cui et al. 2025): a step's first-order change
                                    of entropy is minus this covariance (their natural-gradient form; for a plain
                                    softmax gradient it is the covariance with pi * A), so > 0 predicts entropy
                                    falls (confident tokens pushed up, unlikely ones down)

    sampler_logprobs (B, C): log pi_sampler(y_t); advantages (B,) per completion or (B, C) per token; mask (B, C).
    Logging only: no gradient, detached.
    """
    logp, m = sampler_logprobs.detach().float(), mask.detach().float()
    adv = advantages.detach().float()
    adv = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(m)  # (B, C)
    p, n, mass = logp.exp(), m.sum().clamp(min=1), (adv.abs() * m).sum().clamp(min=1e-12)
    out = {}
    for low, high in PROB_BUCKETS:
        name = "p<0.1" if low == 0 else "p>0.9" if high == 1 else f"p{low}-{high}"
        in_bucket = m * (p >= low) * ((p < high) if high < 1 else 1.0)  # (B, C)
        for sign, chosen in (("pos", adv > 0), ("neg", adv < 0)):
            tokens = in_bucket * chosen
            out[f"tokens/share/{name}/{sign}"] = (tokens.sum() / n).item()
            out[f"tokens/mass/{name}/{sign}"] = ((tokens * adv.abs()).sum() / mass).item()
    mean_logp, mean_adv = (logp * m).sum() / n, (adv * m).sum() / n
    out["tokens/cov_logp_adv"] = (((logp - mean_logp) * (adv - mean_adv) * m).sum() / n).item()
    return out


def print_eval(result: dict, run_dir: str):
    """The closing lines of every script: the eval record's accuracy and pass@k, and where the model is."""
    summary = ", ".join(f"{k} {v:.3f}" for k, v in result.items()  # the overall numbers; per-slice keys stay in the log
                        if (k == "accuracy" or k.startswith("pass@")) and "/" not in k and v is not None)
    print(f"eval on {result['num_prompts']} held-out prompts: {summary}")
    print(f"model saved to {run_dir}/ (AutoModelForCausalLM.from_pretrained('{run_dir}') loads it)")
