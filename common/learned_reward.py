"""A learned reward: a reward_model.py run, loaded frozen, that scores an RL script's rollout.

    reward_model = load_reward_model(args.reward_model, tokenizer, device, dtype)   # None for ""
    rollout = generate_and_score(..., reward_model=reward_model)
    # rollout.rewards = proxy (+ format term); reward_terms["proxy"] = proxy; reward_terms["correct"]
    # is still the verifier's, so `sampled_accuracy` stays the gold accuracy (Gao et al. 2023: watch
    # the gold reward fall while the proxy rises)

Two kinds, told apart by the `reward_model.json` marker reward_model.py writes beside the weights:
- `bt`: an `AutoModelForSequenceClassification` (num_labels = 1): the policy's trunk and a scalar head
  read at the last non-pad token (`bt_score`) of the policy's prompt and the completion, or (a run
  trained with `--reference`) of the question and its reference answer and the completion (`bt_inputs`).
- `judge`: an `AutoModelForCausalLM` shown the question, the reference answer (with `--reference`) and the
  completion (`judge_questions`); the reward is P(yes) normalised over the two verdict tokens, from one
  forward pass, no sampling (`yes_probability`).
The marker also says whether the model reads the reference ({"reference": true}). The tokenizer must be the
policy's in both modes: a bt model reads the policy's own token ids. The functions here are the ones
reward_model.py trains with, so training and scoring read the same position of the same layout.
"""

import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common.cli import arg_error, check_reward_model_folder
from common.logprobs import position_ids_from_mask
from common.preferences import encode_completions
from common.rollout_data import Rollout
from common.tasks import format_prompt

MARKER = "reward_model.json"
"""The file reward_model.py writes into its run folder: {"mode": "bt" | "judge", "reference": bool, "task", "base"}."""
VERDICTS = ("yes", "no")
"""The judge's two answers; its reward is P(first token of "yes") over the first tokens of both."""


def bt_score(model, batch) -> torch.Tensor:
    """r(x, y): the scalar head of a sequence-classification model at the last non-pad token of
    prompt + completion. batch: a Rollout (slice), prompts left-padded, completions right-padded. (B,)

    transformers reads the rightmost token that is not `config.pad_token_id`, which for this layout is
    the completion's last token (its EOS), whatever padding sits on either side.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)  # (B, P + C)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits  # (B, 1)
    return logits.squeeze(-1).float()  # (B,)


def reference_question(question: str, answer: str) -> str:
    """The user turn of a reward model that reads the reference: the question, then the reference answer
    on its own line. Compact on purpose: a 0.5M-parameter model learns to compare two numbers when they sit
    near the position it is read at, not behind a sentence (docs/reward_model.md).
    >>> reference_question("12+26", "38")
    '12+26\\n38'
    """
    return f"{question}\n{answer}"


def judge_questions(questions: list[str], answers: list[str], completions: list[str], reference: bool) -> list[str]:
    """The judge's user turn: the question, the reference answer (with `reference`), then the completion to
    grade, one a line; the chat template then opens the assistant turn, so the next token is the verdict.
    >>> judge_questions(["12+26"], ["38"], ["37"], reference=True)
    ['12+26\\n38\\n37']
    """
    return [f"{reference_question(q, a) if reference else q}\n{c.strip()}"
            for q, a, c in zip(questions, answers, completions, strict=True)]


def bt_inputs(tokenizer, rollout, questions: list[str], answers: list[str], reference: bool) -> Rollout:
    """What a bt reward model reads: the rollout itself (the policy's prompt and tokens), or with `reference`
    the question and its reference answer as the prompt and the completion text re-encoded, ending in EOS."""
    if not reference:
        return rollout
    return encode_completions(tokenizer, [reference_question(q, a) for q, a in zip(questions, answers)],
                              rollout.completions, None, tokenizer.eos_token_id, 10**6, rollout.completion_ids.device)


def verdict_token_ids(tokenizer) -> tuple[int, int]:
    """(yes_id, no_id): the first token of each verdict word ('y' and 'n' for the char tokenizer)."""
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in VERDICTS)
    if yes == no:
        arg_error("reward_model", f"the tokenizer gives {VERDICTS} the same first token; a judge needs two")
    return yes, no


def yes_probability(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, yes_id: int,
                    no_id: int) -> torch.Tensor:
    """P(yes) = softmax([z_yes, z_no])[0] at the position after the prompt: one forward pass, no sampling.
    input_ids, attention_mask (B, L) left-padded judge prompts. Normalised over the two verdicts, so a
    judge that puts mass elsewhere still gives a number in (0, 1). (B,)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=1,
                   use_cache=False).logits[:, -1].float()  # (B, V): the next token's logits
    return torch.softmax(logits[:, [yes_id, no_id]], dim=-1)[:, 0]  # (B,)


class LearnedReward:
    """A frozen reward model; `score` gives one number per rollout row. Runs per rank: no collectives."""

    def __init__(self, model, tokenizer, mode: str, reference: bool):
        self.model, self.tokenizer, self.mode, self.reference = model, tokenizer, mode, reference
        self.verdict_ids = verdict_token_ids(tokenizer) if mode == "judge" else None

    @torch.no_grad()
    def score(self, rollout, questions: list[str], answers: list[str], micro_size: int = 64) -> torch.Tensor:
        """bt: r(x, y) of each row (`bt_inputs`); judge: P(yes) of each row's question, reference answer and
        completion text. questions, answers: one per row. (B,) float32."""
        device = rollout.completion_ids.device
        parts = []
        for start in range(0, len(rollout), micro_size):
            rows = slice(start, start + micro_size)
            if self.mode == "bt":
                batch = bt_inputs(self.tokenizer, rollout[rows], questions[rows], answers[rows], self.reference)
                parts.append(bt_score(self.model, batch))
                continue
            prompts = [format_prompt(self.tokenizer, text) for text in
                       judge_questions(questions[rows], answers[rows], rollout.completions[rows], self.reference)]
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            parts.append(yes_probability(self.model, enc["input_ids"], enc["attention_mask"], *self.verdict_ids))
        return torch.cat(parts).to(device)  # (B,)


def load_reward_model(path: str, policy_tokenizer, device, dtype) -> LearnedReward | None:
    """The reward model of a reward_model.py run folder, frozen (eval mode, no gradients); None for "".
    Exits with one line naming --reward-model when the folder is missing, is not a reward-model run (no
    reward_model.json: a policy folder, say), or has a tokenizer other than the policy's."""
    if not path:
        return None
    check_reward_model_folder(path)
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    if marker.get("mode") not in ("bt", "judge"):
        arg_error("reward_model", f"{path}/{MARKER} names no mode (bt or judge): {marker}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    theirs, ours = tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if theirs != ours:
        differ = len(set(theirs.items()) ^ set(ours.items()))
        arg_error("reward_model", f"{path}: its tokenizer is not the policy's ({len(theirs)} vs {len(ours)} tokens, "
                  f"{differ} entries differ); train one from this policy: python reward_model.py --policy <--model>")
    tokenizer.padding_side = "left"  # judge prompts: the verdict is read at the last position
    auto = AutoModelForSequenceClassification if marker["mode"] == "bt" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    return LearnedReward(model, tokenizer, marker["mode"], marker.get("reference", False))
