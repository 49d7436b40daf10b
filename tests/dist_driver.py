"""Run one of the scripts under torchrun with two test hooks, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node N tests/dist_driver.py OUT_DIR SCRIPT [flags...]

1. Sampling is made a function of the prompt alone: each prompt's G completions are drawn
   under a seed of (seed, prompt position), one prompt at a time. So N processes sample
   exactly the completions one process samples for the same global batch, and the test can
   compare their updates. (Normally each rank has its own RNG stream.)
2. Every optimizer step first saves the gradients it is about to apply (OUT_DIR/grads_rank<r>.pt,
   a list over steps of lists over parameters), so the test compares gradients, not only weights:
   AdamW's first step is ~lr * sign(g), blind to a gradient that is off by a factor.
   DIST_PER_PROMPT_SAMPLING=0 keeps the script's own sampling (each rank its RNG stream).
3. DIST_KILL_AT_STEP=k kills every rank (os._exit, like a SIGKILL: no cleanup) when step k is logged.
"""

import importlib
import os
import sys

import torch

out_dir, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, os.getcwd())
module = importlib.import_module(script.removesuffix(".py"))

if hasattr(module, "generate_and_score") and os.environ.get("DIST_PER_PROMPT_SAMPLING", "1") == "1":
    from common.rollout import Rollout

    real_generate_and_score = module.generate_and_score

    def generate_and_score_per_prompt(engine, tokenizer, task, position, num_prompts, seed, *args, **kwargs):
        parts = []
        for p in range(position, position + num_prompts):
            torch.manual_seed(seed * 1_000_003 + p)
            parts.append(real_generate_and_score(engine, tokenizer, task, p, 1, seed, *args, **kwargs))
        return Rollout.cat(parts, tokenizer.pad_token_id)

    module.generate_and_score = generate_and_score_per_prompt

saved = []
real_step = torch.optim.AdamW.step


def step_saving_gradients(self, *args, **kwargs):
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for group in self.param_groups for p in group["params"] if p.grad is not None]
    saved.append([g.detach().cpu().clone() for g in grads])
    rank = int(os.environ.get("RANK", 0))
    torch.save(saved, os.path.join(out_dir, f"grads_rank{rank}.pt"))
    return real_step(self, *args, **kwargs)


torch.optim.AdamW.step = step_saving_gradients

kill_at = int(os.environ.get("DIST_KILL_AT_STEP", 0))
if kill_at:
    from common.tracking import RunLogger

    real_log = RunLogger.log

    def log_then_die(self, step, metrics):
        if step == kill_at:
            os._exit(1)
        return real_log(self, step, metrics)

    RunLogger.log = log_then_die
module.main(module.parse_args(argv))
