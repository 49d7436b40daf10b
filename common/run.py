"""The edges of every script: `start_run` (its first lines) and `finish_run` (its last ones).

What every script does before its first step and after its last, the same way: check the shared
flags, join torchrun's process group, seed, name the run folder; then save the final model,
evaluate on the held-out prompts and write the closing `{"event": "eval", ...}` record.
"""

import os

import torch

from common.checkpoint import check_resume_script, save_final_model, warn_if_task_mismatch
from common.cli import validate_run
from common.distributed import World, cleanup, setup_distributed
from common.evaluation import evaluate
from common.models import pick_dtype
from common.tracking import print_eval


def start_run(args, script: str, rank_seed: bool = True) -> tuple[World, str, torch.dtype]:
    """Every script's first lines: check the shared flags (common/cli.py's RunArgs), name the run folder
    (runs/<run_name>, the script's name when --run-name is empty), refuse --resume on a folder another
    script wrote, join torchrun's process group (or be the one process), seed torch with --seed + rank
    (each rank samples its own completions; rank_seed=False: --seed on every rank, for identical initial
    weights), and warn when --model is a run trained on another task. Returns (world, run_dir, dtype)."""
    validate_run(args)
    args.run_name = args.run_name or script
    if args.resume:  # a folder another script wrote: one line naming both, before anything is loaded
        check_resume_script(os.path.join("runs", args.run_name), script)
    world = setup_distributed(args.device)
    torch.manual_seed(args.seed + world.rank * rank_seed)
    warn_if_task_mismatch(args.model, args.task)
    return world, os.path.join("runs", args.run_name), pick_dtype(args.dtype, world.device)


def finish_run(run_dir: str, model, tokenizer, task, engine, eos_ids, args, max_new_tokens: int, logger) -> dict:
    """The end of every script: the final model (from_pretrained-loadable) at the top of run_dir, the
    held-out evaluation as the closing {"event": "eval", ...} record, the closing lines. Returns the record."""
    save_final_model(run_dir, model, tokenizer)
    if engine is not None:
        engine.sync_weights(model)  # the final evaluation samples with the engine
    result = evaluate(model, tokenizer, task, args.num_eval_prompts, args.num_eval_samples, max_new_tokens,
                      engine=engine, eos_ids=eos_ids)
    logger.log(args.total_steps, result)
    logger.close()
    print_eval(result, run_dir)
    cleanup()
    return result
