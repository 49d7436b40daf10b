"""common/evaluation.py (pass@k), common/tasks.py, common/checkpoint.py and model loading."""

import copy
import itertools
import os
import random
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

import common.models
from common.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint, save_checkpoint
from common.evaluation import pass_at_k, pass_at_k_curve, powers_of_two
from common.models import CHATML_TEMPLATE, build_tiny_model, load_model_and_tokenizer
from common.rewards import countdown_verifier, math_verifier
from common.tasks import encode_demonstrations, gsm8k_record, load_task, make_countdown_task, rows_at

# ---------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding at least one correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=1e-12)


@pytest.mark.parametrize("n, k", [(1, 2), (4, 5), (8, 16)])
def test_pass_at_k_needs_k_samples(n, k):
    with pytest.raises(ValueError):
        pass_at_k(n, 0, k)


def test_pass_at_k_curve_matches_enumeration():
    """The curve is the per-prompt enumeration, averaged over prompts, for every k asked."""
    counts = [(n, c) for n in range(1, 8) for c in range(n + 1)] * 2 + [(7, 2)]
    for k in range(1, 8):
        usable = [(n, c) for n, c in counts if n >= k]
        curve = pass_at_k_curve(usable, ks=[k])
        expected = sum(brute_force_pass_at_k(n, c, k) for n, c in usable) / len(usable)
        assert list(curve) == [k] and curve[k] == pytest.approx(expected, abs=1e-12), k


def test_pass_at_k_curve_of_64_samples_is_monotone_and_ends_at_any_correct():
    counts = [(64, c) for c in (0, 1, 3, 20, 64)]
    curve = pass_at_k_curve(counts, ks=range(1, 65))
    assert list(curve) == list(range(1, 65))
    assert curve[1] == pytest.approx((0 + 1 + 3 + 20 + 64) / 64 / 5, abs=1e-12)
    assert all(curve[k] <= curve[k + 1] + 1e-12 for k in range(1, 64))
    assert curve[64] == pytest.approx(4 / 5, abs=1e-12)  # every prompt with a right sample counts
    # one prompt right once in 64: pass@k = k / 64 exactly
    single = pass_at_k_curve([(64, 1)], ks=range(1, 65))
    assert all(single[k] == pytest.approx(k / 64, abs=1e-12) for k in single)


def test_pass_at_k_curve_needs_k_samples_and_prompts():
    with pytest.raises(ValueError):
        pass_at_k_curve([(8, 1), (4, 1)], ks=[8])
    with pytest.raises(ValueError):
        pass_at_k_curve([], ks=[1])


def test_default_ks_are_powers_of_two():
    assert powers_of_two(8) == (1, 2, 4, 8)  # the classic eval record
    assert powers_of_two(1) == (1,)
    assert powers_of_two(12) == (1, 2, 4, 8)
    assert powers_of_two(64) == (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------
# rows_at: the data order as a pure function of (seed, position)
# ---------------------------------------------------------------------------------------


def test_rows_at_is_deterministic_in_seed_and_position():
    assert rows_at(37, 5, 60, seed=3) == rows_at(37, 5, 60, seed=3)
    assert rows_at(37, 0, 37, seed=3) != rows_at(37, 0, 37, seed=4)
    # a window is the same rows whatever position the stream was read from
    assert rows_at(37, 30, 20, seed=3) == rows_at(37, 0, 50, seed=3)[30:50]


def test_rows_at_two_epochs_cover_each_row_exactly_twice():
    n = 23
    rows = rows_at(n, 0, 2 * n, seed=1)
    assert Counter(rows) == {i: 2 for i in range(n)}
    assert sorted(rows[:n]) == list(range(n))  # each epoch is a permutation
    assert rows[:n] != rows[n:]  # ... reshuffled per epoch
    assert rows[:n] != list(range(n))  # ... and actually shuffled


def test_rows_at_concatenates():
    for n in (7, 16):
        assert rows_at(n, 0, 10, seed=0) + rows_at(n, 10, 5, seed=0) == rows_at(n, 0, 15, seed=0)


# ---------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def add_noisy():
    return load_task("add_noisy")


def test_add_noisy_teacher_is_right_60_percent_and_off_by_at_most_one(add_noisy):
    train = add_noisy.train[:]  # dict of lists (column access row by row is slow)
    questions, answers, demos = train["question"], train["answer"], train["demonstration"]
    errors = []
    for q, a, d in zip(questions, answers, demos):
        x, y = map(int, q.split("+"))
        assert int(a) == x + y  # the reference is always right
        errors.append(int(d) - int(a))
    counts = Counter(errors)
    assert set(counts) <= {-1, 0, 1}
    assert 0.55 <= counts[0] / len(errors) <= 0.65
    assert 0.45 <= counts[1] / (counts[1] + counts[-1]) <= 0.55  # +1 and -1 equally likely


def test_add_noisy_test_split_is_disjoint_from_train(add_noisy):
    train, test = add_noisy.train[:], add_noisy.test[:]
    train_questions, test_questions = set(train["question"]), test["question"]
    assert len(test_questions) == len(set(test_questions)) > 0
    assert not train_questions & set(test_questions)
    # the test demonstrations are the right answers
    for q, a, d in zip(test_questions, test["answer"], test["demonstration"]):
        x, y = map(int, q.split("+"))
        assert int(a) == int(d) == x + y


def test_unknown_task_exits_naming_the_flag():
    with pytest.raises(SystemExit) as info:
        load_task("no_such_task")
    assert "--task" in str(info.value.code)
    assert "add_noisy" in str(info.value.code)  # and lists the known ones


GSM8K_RECORDS = [
    {
        "question": "  Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
        "in May. How many clips did Natalia sell altogether in April and May?\n",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "She then sold 1162 more in June: 72+1162 = <<72+1162=1234>>1234.\n#### 1,234",
    },
    {
        "question": "Weng earns $12 an hour. How much did she earn for 1,234 hours?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nSo she earned <<12*1234=14808>>14,808 "
        "minus 13,574 = <<14808-13574=1234>>1234.\n#### 1,234",
    },
]


@pytest.mark.parametrize("record", GSM8K_RECORDS)
def test_gsm8k_record(record):
    row = gsm8k_record(record)
    assert row["question"] == record["question"].strip()
    assert row["answer"] == "1234"
    demo = row["demonstration"]
    assert "<<" not in demo and ">>" not in demo and "####" not in demo
    assert re.search(r"\\boxed\{1234\}\.?$", demo), demo  # ends with the boxed answer
    assert demo.startswith(record["answer"].split("<<")[0])  # the reasoning is kept
    assert math_verifier(demo, row["answer"]) == (1.0, "correct")


def test_gsm8k_record_removes_notes_exactly():
    row = gsm8k_record({"question": "q", "answer": "So 3*4 = <<3*4=12>>12 apples.\n#### 12"})
    assert row["demonstration"].startswith("So 3*4 = 12 apples.\n")


def test_countdown_demonstrations_pass_the_verifier():
    task = make_countdown_task(num_train=50, num_test=10)
    assert len(task.train) == 50 and len(task.test) == 10
    for split in (task.train, task.test):
        for demo, answer in zip(split["demonstration"], split["answer"]):
            assert countdown_verifier(demo, answer) == (1.0, "correct"), (demo, answer)


# ---------------------------------------------------------------------------------------
# encode_demonstrations
# ---------------------------------------------------------------------------------------


def test_encode_demonstrations_layout(tokenizer):
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def char_ids(text):  # the char tokenizer's vocabulary: one id per character
        return tokenizer.convert_tokens_to_ids(list(text))

    prompts = ["12+3", "7+80=?", "1"]
    completions = ["15", "87 is it", "x"]
    prompt_ids, prompt_mask, completion_ids, completion_mask = encode_demonstrations(
        tokenizer, prompts, completions, eos_id=eos, max_completion_len=6
    )
    assert prompt_ids.tolist() == [
        [pad, pad] + char_ids("12+3"),
        char_ids("7+80=?"),
        [pad] * 5 + char_ids("1"),
    ]
    assert prompt_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [0] * 5 + [1]]
    # right-padded, EOS appended and counted; "87 is it" + EOS is 9 tokens, cut to 6 (no EOS left)
    assert completion_ids.tolist() == [
        char_ids("15") + [eos, pad, pad, pad],
        char_ids("87 is "),
        char_ids("x") + [eos, pad, pad, pad, pad],
    ]
    assert completion_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]


def test_encode_demonstrations_width_is_the_longest_completion(tokenizer):
    eos = tokenizer.eos_token_id
    _, _, completion_ids, completion_mask = encode_demonstrations(
        tokenizer, ["a", "b"], ["1", "22"], eos_id=eos, max_completion_len=100
    )
    assert completion_ids.shape == (2, 3)
    assert completion_mask.sum(-1).tolist() == [2, 3]
    assert completion_ids[:, -1].tolist() == [tokenizer.pad_token_id, eos]


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------


def train_one_step(model, optimizer, scheduler, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (2, 9), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def make_trainer(tokenizer):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def assert_same_tree(a, b):
    """Exact equality of nested optimizer/scheduler state (tensors compared elementwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


def test_checkpoint_round_trip_restores_everything(tokenizer, tmp_path):
    run_dir = str(tmp_path / "run")
    model, optimizer, scheduler = make_trainer(tokenizer)
    for s in range(2):
        train_one_step(model, optimizer, scheduler, seed=s)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scheduler_state = copy.deepcopy(scheduler.state_dict())
    lr = optimizer.param_groups[0]["lr"]
    extra = {"data_position": 256, "baseline": 0.25}

    path = save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step=2, extra=extra)
    assert path == os.path.join(run_dir, "checkpoint") and find_checkpoint(run_dir) == path
    # what the run would draw next, had it gone on from the save
    expected_draws = (torch.rand(4), random.random(), np.random.rand(3))

    # ... but it goes on: more steps change weights, optimizer, scheduler and every RNG.
    train_one_step(model, optimizer, scheduler, seed=7)
    torch.rand(10), random.random(), np.random.rand(5)
    assert not torch.equal(model.state_dict()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    assert optimizer.param_groups[0]["lr"] != lr

    state = load_checkpoint(find_checkpoint(run_dir), model, optimizer, scheduler)
    draws = (torch.rand(4), random.random(), np.random.rand(3))

    restored = model.state_dict()
    assert set(restored) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(restored[name], tensor), name
    assert_same_tree(optimizer.state_dict(), optimizer_state)
    assert_same_tree(scheduler.state_dict(), scheduler_state)
    assert optimizer.param_groups[0]["lr"] == lr
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1] == expected_draws[1]
    np.testing.assert_array_equal(draws[2], expected_draws[2])
    assert state["step"] == 2
    assert state["extra"] == extra

    # The restored optimizer continues exactly like the original: one more identical step on both.
    twin, twin_optimizer, twin_scheduler = make_trainer(tokenizer)
    for s in range(2):
        train_one_step(twin, twin_optimizer, twin_scheduler, seed=s)
    train_one_step(model, optimizer, scheduler, seed=9)
    train_one_step(twin, twin_optimizer, twin_scheduler, seed=9)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_second_save_replaces_the_first(tokenizer, tmp_path):
    run_dir = str(tmp_path)
    model, optimizer, scheduler = make_trainer(tokenizer)
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step=1, extra={"data_position": 1})
    train_one_step(model, optimizer, scheduler, seed=0)
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step=2, extra={"data_position": 2})
    assert sorted(os.listdir(run_dir)) == ["checkpoint"]
    state = torch.load(os.path.join(find_checkpoint(run_dir), STATE_FILE), weights_only=False)
    assert state["step"] == 2 and state["extra"] == {"data_position": 2}


def test_leftover_tmp_folder_does_not_break_find_or_save(tokenizer, tmp_path):
    run_dir = str(tmp_path)
    model, optimizer, scheduler = make_trainer(tokenizer)
    assert find_checkpoint(run_dir) is None
    # a run killed while writing its first checkpoint: a partial checkpoint.tmp only
    os.makedirs(os.path.join(run_dir, "checkpoint.tmp"))
    with open(os.path.join(run_dir, "checkpoint.tmp", "config.json"), "w") as f:
        f.write("{partial")
    assert find_checkpoint(run_dir) is None
    # the next save works over it
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step=3, extra={})
    assert find_checkpoint(run_dir) == os.path.join(run_dir, "checkpoint")
    # a later run killed while writing: a complete checkpoint plus a partial tmp
    os.makedirs(os.path.join(run_dir, "checkpoint.tmp"))
    assert find_checkpoint(run_dir) == os.path.join(run_dir, "checkpoint")
    state = load_checkpoint(find_checkpoint(run_dir), model, optimizer, scheduler)
    assert state["step"] == 3


def test_killed_between_the_renames_falls_back_to_old(tokenizer, tmp_path):
    run_dir = str(tmp_path)
    model, optimizer, scheduler = make_trainer(tokenizer)
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step=4, extra={"data_position": 4})
    # the state right after `os.replace(final, old)`: no checkpoint/, a complete checkpoint.old/
    shutil.move(os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.old"))
    assert find_checkpoint(run_dir) == os.path.join(run_dir, "checkpoint.old")
    state = load_checkpoint(find_checkpoint(run_dir), model, optimizer, scheduler)
    assert state["step"] == 4


# ---------------------------------------------------------------------------------------
# load_model_and_tokenizer
# ---------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch):
    """Any hub lookup fails at once as it does without network (instead of ~45 s of retries); records names."""
    calls = []

    def unreachable(name, *args, **kwargs):
        calls.append(name)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.")

    monkeypatch.setattr(common.models.AutoTokenizer, "from_pretrained", unreachable)
    monkeypatch.setattr(common.models.AutoModelForCausalLM, "from_pretrained", unreachable)
    return calls


def test_missing_model_exits_naming_the_flag(offline_hub):
    with pytest.raises(SystemExit) as info:
        load_model_and_tokenizer("runs/does-not-exist", torch.device("cpu"), torch.float32, hint="run sft.py first")
    message = str(info.value.code)
    assert "--model" in message and "runs/does-not-exist" in message and "run sft.py first" in message
    assert "\n" not in message


def test_missing_local_run_folder_is_not_looked_up_on_the_hub(offline_hub, tmp_path, monkeypatch):
    """`runs/<name>` is where every script writes (and the RL scripts' default --model is runs/sft).
    When it is missing, the answer is "no such folder" at once, not a hub lookup of "runs/<name>"
    (which, without network, costs ~45 s of retries before failing with a connection error)."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/other-run")
    with pytest.raises(SystemExit) as info:
        load_model_and_tokenizer("runs/does-not-exist", torch.device("cpu"), torch.float32)
    assert offline_hub == [], "a missing local folder was looked up on the hub"
    assert "no such folder" in str(info.value.code)


def test_missing_absolute_or_dotted_path_says_no_such_folder(offline_hub, tmp_path):
    for name in (str(tmp_path / "nothing"), "./nothing/here"):
        with pytest.raises(SystemExit) as info:
            load_model_and_tokenizer(name, torch.device("cpu"), torch.float32)
        assert "--model" in str(info.value.code) and "no such folder" in str(info.value.code)
    assert offline_hub == []


def test_saved_tiny_model_and_tokenizer_reload_identically(tokenizer, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, reloaded = load_model_and_tokenizer(str(tmp_path), torch.device("cpu"), torch.float32)

    text = "12 + 3\n"
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.convert_tokens_to_ids(list(text))  # one token per character survived
    assert reloaded.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n12 + 3\n<|im_end|>\n<|im_start|>assistant\n"
    for tok in (tokenizer, reloaded):
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert reloaded.chat_template == CHATML_TEMPLATE
    assert (
        reloaded(expected, add_special_tokens=False)["input_ids"]
        == tokenizer(expected, add_special_tokens=False)["input_ids"]
    )
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert reloaded.padding_side == "left"

    original = tiny_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
