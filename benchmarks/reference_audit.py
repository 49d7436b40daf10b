"""Flag training prompts whose reference answer is probably wrong (the "错题" of the survey "rl与sft").

    python benchmarks/reference_audit.py --model runs/grpo --task add_noisy_wrongref20 [--num-prompts 400]

For each training prompt the model samples n completions at T = 1. Two signatures differ:
- likely wrong reference: the samples *agree with each other* (the most common answer has at
  least --agree of them) but *never* match the reference. A model that is sure and always
  "wrong" on a prompt it otherwise handles like its neighbours points at the label.
- hard prompt: the samples disagree (no answer reaches --agree) and rarely match (at most
  --rarely of them): the model is unsure; the label may be fine.
Everything else is "ok". When the task has an `expert` column (the known-clean answer, as in
the add_noisy_wrongref* tasks) the report also scores the flags against it: precision and
recall of "likely wrong reference". Writes one JSON line per prompt to --out.
"""

import argparse
import collections
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import eos_token_ids, load_model_and_tokenizer  # noqa: E402
from common.rewards import score_completions  # noqa: E402
from common.rollout import generate_hf  # noqa: E402
from common.tasks import format_prompt, load_task  # noqa: E402


def classify(answers: list[str], correct: list[float], agree: float, rarely: float) -> tuple[str, float, float]:
    """(label, share of the most common answer, share matching the reference) for one prompt's samples.

    >>> classify(["12", "12", "12", "13"], [0, 0, 0, 0], 0.5, 0.25)
    ('likely_wrong_reference', 0.75, 0.0)
    >>> classify(["12", "14", "15", "13"], [0, 0, 1, 0], 0.5, 0.25)
    ('hard', 0.25, 0.25)
    """
    n = len(answers)
    top_share = collections.Counter(a.strip() for a in answers).most_common(1)[0][1] / n
    right_share = sum(correct) / n
    if top_share >= agree and right_share == 0:
        return "likely_wrong_reference", top_share, right_share
    if top_share < agree and right_share <= rarely:
        return "hard", top_share, right_share
    return "ok", top_share, right_share


def final_answer(verifier: str, completion: str) -> str:
    """What samples agree or disagree on: the whole answer, or for countdown_steps the last result (many
    paths reach one target, so the paths themselves rarely agree).

    >>> final_answer("countdown_steps", "14+9=23 (2 17 23) 23+17=40 (2 40) 40-2=38"), final_answer("number", " 27")
    ('38', '27')
    """
    if verifier == "countdown_steps":
        results = re.findall(r"=\s*(-?\d+)", completion)
        return results[-1] if results else completion.strip()
    return completion.strip()


@torch.no_grad()
def audit(model, tokenizer, task, num_prompts: int, samples: int, agree: float, rarely: float, seed: int = 0,
          batch: int = 64) -> list[dict]:
    """One record per prompt: question, reference, label, top_share, right_share, top_answer (and truth)."""
    prompts = task.prompts.select(range(min(num_prompts, len(task.prompts))))
    eos_ids = eos_token_ids(model, tokenizer)
    records = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch):
        rows = prompts.select(range(start, min(start + batch, len(prompts))))
        texts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
        out = generate_hf(model, tokenizer, texts, samples, 1.0, task.max_new_tokens, eos_ids=eos_ids)
        answers = [rows["answer"][i] for i in out.prompt_index.tolist()]
        _, terms, _ = score_completions(task.verifier, out.completions, answers, out.is_eos.tolist())
        for i in range(len(rows)):
            comps = [final_answer(task.verifier, c) for c in out.completions[i * samples:(i + 1) * samples]]
            label, top, right = classify(comps, terms["correct"][i * samples:(i + 1) * samples], agree, rarely)
            record = {"question": rows["question"][i], "reference": rows["answer"][i], "label": label,
                      "top_share": top, "right_share": right,
                      "top_answer": collections.Counter(comps).most_common(1)[0][0]}
            if "expert" in rows.column_names:  # the known-clean completion: to score the audit, never to flag
                expert = rows["expert"][i]
                _, expert_terms, _ = score_completions(task.verifier, [expert], [rows["answer"][i]], [True])
                record["reference_is_right"] = expert_terms["correct"][0] == 1  # the verifier accepts the truth
                truth = final_answer(task.verifier, expert)
                record["truth_share"] = sum(c == truth for c in comps) / samples
            records.append(record)
    return records


def summary(records: list[dict]) -> dict:
    """Counts per label and, when the truth is known, precision/recall of likely_wrong_reference."""
    out = {"prompts": len(records), **collections.Counter(r["label"] for r in records)}
    if records and "reference_is_right" in records[0]:
        flagged = [r for r in records if r["label"] == "likely_wrong_reference"]
        wrong = [r for r in records if not r["reference_is_right"]]
        hits = sum(not r["reference_is_right"] for r in flagged)
        out.update(wrong_references=len(wrong), flagged=len(flagged),
                   precision=hits / len(flagged) if flagged else None, recall=hits / len(wrong) if wrong else None)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--agree", type=float, default=0.5, help="share of samples on one answer = agreement")
    parser.add_argument("--rarely", type=float, default=0.25, help="right_share at most this is 'rarely right'")
    parser.add_argument("--out", default=None, help="JSONL per prompt (default MODEL/reference_audit.jsonl)")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    records = audit(model, tokenizer, load_task(args.task), args.num_prompts, args.samples, args.agree, args.rarely)
    out = args.out or os.path.join(args.model, "reference_audit.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(json.dumps(summary(records)))
    for r in [r for r in records if r["label"] == "likely_wrong_reference"][:20]:
        print(f"  likely wrong: {r['question']} reference {r['reference']}, samples say {r['top_answer']} "
              f"({r['top_share']:.0%} agree)")
    print(f"every prompt: {out}")


if __name__ == "__main__":
    main()
