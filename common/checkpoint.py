"""Resumable checkpoints: HF-format weights plus everything needed to continue exactly.

Layout of a run folder `runs/<run_name>/`:
    config.json, model.safetensors, tokenizer*   the final model (from_pretrained loads it)
    checkpoint/                                  the latest resumable state:
        config.json, model.safetensors, ...      the weights at that step (HF format)
        trainer_state.pt                         optimizer, scheduler, RNG, step, data position
        args.json                                a copy of the run's args.json: which script wrote it
    metrics.jsonl                                one JSON object per step, then the eval record

A checkpoint is written to `checkpoint.tmp/` and swapped in by renames, so a run killed
while saving still has the previous complete checkpoint.

Under torchrun every rank calls these functions (FSDP2 gathers the full weights and optimizer
state collectively); rank 0 alone writes, with every rank's RNG state, so a resumed run
continues each rank's sampling stream exactly. A LoRA run also keeps its adapters in
`adapter/` beside the merged weights (the folder stays `from_pretrained`-loadable).
"""

import json
import math
import os
import random
import shutil
import sys

import numpy as np
import torch

from common import distributed

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, model, tokenizer, optimizer, scheduler, step: int, extra: dict | None = None):
    """Atomically replace `run_dir/checkpoint` with the state after `step` optimizer steps.

    `extra` holds the small values a script needs beyond the standard state, e.g.
    `data_position` (prompts consumed so far) or an EMA baseline.
    """
    final, tmp, old = (os.path.join(run_dir, name) for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    weights = distributed.full_state_dict(model, to_cpu=True)  # collective under FSDP2
    state = {
        "step": step,
        "optimizer": distributed.optimizer_state_dict(model, optimizer),  # collective under FSDP2
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": distributed.all_gather_object(rng_state()),  # one per rank
        "extra": extra or {},
    }
    if distributed.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _save_weights(tmp, model, tokenizer, weights)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        if os.path.exists(os.path.join(run_dir, "args.json")):  # the writer's script, for --resume to check
            shutil.copy(os.path.join(run_dir, "args.json"), tmp)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _save_weights(folder: str, model, tokenizer, weights: dict):
    """HF-format full weights (LoRA merged) in folder; a LoRA model's adapters in folder/adapter."""
    model = distributed.unwrap(model)
    if hasattr(model, "get_base_model"):  # peft: merged weights for from_pretrained, adapters beside them
        model.save_pretrained(os.path.join(folder, "adapter"))
        model = model.get_base_model()
    model.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)


def find_checkpoint(run_dir: str) -> str | None:
    """The latest complete checkpoint folder, also if a run died between the two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(run_dir, name)
        if os.path.exists(os.path.join(path, STATE_FILE)):
            return path
    return None


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Load weights, optimizer, scheduler and RNG in place; return the state (step, extra).

    A damaged checkpoint (a truncated file, a half-copied folder) exits with one line that
    names the file and the way out, not a SafetensorError traceback.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    inner = distributed.unwrap(model)
    # reward_model.py --mode bt trains a scalar head on the trunk: its checkpoint loads as what it is
    auto = AutoModelForSequenceClassification if "ForSequenceClassification" in type(inner).__name__ else \
        AutoModelForCausalLM
    try:
        if hasattr(inner, "get_base_model"):  # LoRA: the base is args.model; only the adapters trained
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(inner, load_file(os.path.join(path, "adapter", "adapter_model.safetensors")))
        else:
            weights = auto.from_pretrained(path, dtype=next(model.parameters()).dtype).state_dict()
            distributed.load_full_state_dict(model, weights)
    except Exception as e:  # SafetensorError, OSError, size mismatches: all mean "this folder is not usable"
        _damaged(path, "model.safetensors", e)
    try:
        state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
        distributed.load_optimizer_state_dict(model, optimizer, state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    except Exception as e:
        _damaged(path, STATE_FILE, e)
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) != distributed.world_size():
        sys.exit(f"error: --resume: {path} was written by {len(rngs)} process(es), this run has "
                 f"{distributed.world_size()}; resume with torchrun --nproc_per_node {len(rngs)} "
                 f"(or plain python for 1) to continue exactly")
    set_rng_state(rngs[distributed.rank()])
    return state


def resume_from(run_dir: str, model, optimizer, scheduler=None, learning_rate: float | None = None,
                script: str | None = None, expect: tuple[str, ...] = ()) -> tuple[int, dict]:
    """`--resume`: load the latest checkpoint of run_dir in place; return (step, extra).

    learning_rate replaces the saved one (the peak, with a scheduler), so a run stopped for
    diverging can resume with a lower --learning-rate; unchanged flags resume exactly.
    script: the caller's name as its args.json records it ("grpo"): a checkpoint another script wrote
    is refused in one line naming both (`check_resume_script`; common/run.py's start_run already did
    it for every script). expect: keys of `extra` to require now; any key a script reads later and
    the checkpoint lacks also stops the run in one line naming it (`SavedState`), never a KeyError.
    """
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        sys.exit(f"error: --resume: no checkpoint in {run_dir}/; run without --resume to start")
    if script:
        check_resume_script(run_dir, script)
    state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    extra = SavedState(state["extra"], checkpoint, script or checkpoint_script(checkpoint))  # start_run: the same
    for key in expect:
        extra[key]  # noqa: B018 (a missing key stops the run here, before anything else is read)
    if learning_rate is not None and scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
    elif learning_rate is not None:  # LambdaLR: lr = base_lr * factor(step); rescale, the factor resumes as is
        scale = learning_rate / scheduler.base_lrs[0]  # exactly 1.0 when the flag is unchanged
        scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
        for group in optimizer.param_groups:
            group["lr"] *= scale
    print(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], extra


class SavedState(dict):
    """A checkpoint's `extra` (data_position, a baseline's state, ...). Reading a key it lacks stops the run
    with one line naming the key (a folder another script, or an older version of this one, wrote)."""

    def __init__(self, values: dict, checkpoint: str, script: str | None = None):
        super().__init__(values)
        self.checkpoint, self.reader = checkpoint, f"{script}.py" if script else "this script"

    def __missing__(self, key):
        sys.exit(f"error: --resume: {self.checkpoint} has no {key!r} in its saved state, which {self.reader} needs "
                 f"to continue (saved by another script or an older version of this one; it holds "
                 f"{sorted(self) or 'nothing'}); start again without --resume, or with another --run-name")


def check_resume_script(run_dir: str, script: str):
    """--resume on a folder another script wrote (`python grpo.py`, then `python reinforce.py --run-name grpo
    --resume`) is refused in one line naming both; a folder whose args.json names no script is not checked."""
    checkpoint = find_checkpoint(run_dir)
    writer = checkpoint_script(checkpoint) if checkpoint else None
    if writer and writer != script:
        sys.exit(f"error: --resume: {checkpoint} was written by {writer}.py (its args.json), not {script}.py; to "
                 f"continue that run use {writer}.py with the same --run-name, or start {script}.py in another "
                 f"folder: another --run-name (e.g. --run-name {script}_1) without --resume")


def checkpoint_script(checkpoint: str) -> str | None:
    """The script that wrote a checkpoint: "script" of its own args.json copy, else of the run folder's
    (checkpoints saved before the copy existed); None when neither says (runs older than the key)."""
    for folder in (checkpoint, os.path.dirname(checkpoint)):
        try:
            with open(os.path.join(folder, "args.json")) as f:
                return json.load(f).get("script")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _damaged(path: str, name: str, error: Exception):
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    sys.exit(f"error: --resume: {os.path.join(path, name)} is damaged ({type(error).__name__}: {reason}). "
             f"Delete {path} and resume from an older copy if one is beside it, or start again without --resume.")


def stop_if_not_finite(step: int, run_dir: str, **values):
    """Stop a diverging run at the first non-finite loss or gradient, before the optimizer applies it.

    One line names the step, the quantity and the checkpoint to resume from; weights that have
    gone NaN would otherwise crash several steps later deep inside sampling (torch.multinomial).
    """
    for name, value in values.items():
        if not math.isfinite(float(value)):
            checkpoint = find_checkpoint(run_dir)
            if checkpoint is None:
                where = "no checkpoint was written yet; lower --learning-rate (or --max-grad-norm) and start again"
            else:
                saved = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=False)["step"]
                where = (f"the last checkpoint is {checkpoint} (step {saved}); lower --learning-rate "
                         "(or --max-grad-norm) and add --resume")
            sys.exit(f"error: step {step}: {name} is {float(value)}; stopped before the optimizer applied it. {where}.")


def warn_if_task_mismatch(model_path: str, task_name: str):
    """Warn in one line when --model is a run folder trained on another task (its args.json says which).

    Starting RL on task B from an SFT model of task A runs to the end and reports 0.000
    everywhere; the warning says why before the first step.
    """
    try:
        with open(os.path.join(model_path, "args.json")) as f:
            trained_on = json.load(f).get("task")
    except (OSError, ValueError):
        return  # a hub model or a folder we did not write: nothing to compare
    if trained_on and trained_on != task_name:
        print(f"warning: --task {task_name}: the model {model_path} was trained on task {trained_on!r} "
              f"(its args.json); train one on {task_name} first, e.g. `python sft.py --task {task_name} "
              f"--run-name sft_{task_name}`, and pass --model runs/sft_{task_name}")


def save_final_model(run_dir: str, model, tokenizer) -> str:
    """The trained model in HF format at the top of the run folder: full weights (gathered under
    FSDP2, merged under LoRA, with the adapters in run_dir/adapter). Rank 0 writes."""
    weights = distributed.full_state_dict(model, to_cpu=True)
    if distributed.rank() == 0:
        _save_weights(run_dir, model, tokenizer, weights)
    distributed.barrier()
    return run_dir
