"""Resumable checkpoints: HF-format weights plus everything needed to continue exactly.

Layout of a run folder `runs/<run_name>/`:
    config.json, model.safetensors, tokenizer*   the final model (from_pretrained loads it)
    checkpoint/                                  the latest resumable state:
        config.json, model.safetensors, ...      the weights at that step (HF format)
        trainer_state.pt                         optimizer, scheduler, RNG, step, data position
    metrics.jsonl                                one JSON object per step, then the eval record

A checkpoint is written to `checkpoint.tmp/` and swapped in by renames, so a run killed
while saving still has the previous complete checkpoint.
"""

import os
import random
import shutil

import numpy as np
import torch

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
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str) -> str | None:
    """The latest complete checkpoint folder, also if a run died between the two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(run_dir, name)
        if os.path.exists(os.path.join(path, STATE_FILE)):
            return path
    return None


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Load weights, optimizer, scheduler and RNG in place; return the state (step, extra)."""
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype).state_dict()
    model.load_state_dict(weights)
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def save_final_model(run_dir: str, model, tokenizer) -> str:
    """The trained model in HF format at the top of the run folder."""
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    return run_dir
