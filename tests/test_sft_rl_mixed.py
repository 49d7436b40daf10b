"""sft_rl_mixed.py: each mode against an independent computation, the shared invariances, and its errors.

weighted at mu = 1 is sft.py's loss and at mu = 0 is grpo.py's; LUFFY's expert gradient follows f'(p) and its
advantages come from the mixed group of G + 1; RFT trains on exactly the accepted samples; on-policy
distillation has a zero gradient against itself, the advantage of an independent teacher/student forward,
and a teacher that never changes. Micro-batch invariance and exact resume, as for grpo.py.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo
import sft
import sft_rl_mixed as srm
from common.logprobs import completion_logprobs
from common.models import build_char_tokenizer, build_tiny_model, load_model_and_tokenizer
from common.tasks import encode_demonstrations, format_prompt, load_task, rows_at
from common.tracking import RunLogger, read_metrics

QUIET = ["--no-tensorboard", "--num-eval-prompts", "8", "--num-eval-samples", "2", "--eval-every", "0"]
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def sft_model(sft_run):
    """The shared short SFT run (tests/conftest.py): groups have both right and wrong samples."""
    return sft_run[0]


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """A teacher with the policy's tokenizer and other (random) weights."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, hidden_size=64, seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _mixed(model_dir, *flags):
    return srm.main(srm.parse_args(["--model", model_dir, *QUIET, *flags]))


def _steps(run):
    return [r for r in read_metrics(f"runs/{run}") if "event" not in r]


def _weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


# ---- weighted: mu = 1 is sft.py, mu = 0 is grpo.py --------------------------------------------------------


def test_weighted_with_mu_1_is_sfts_loss_in_value_and_gradient(sft_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _mixed(sft_model, "--mode", "weighted", "--mu", "1", "--total-steps", "1", "--num-prompts", "8",
           "--run-name", "mu1")
    logged = _steps("mu1")[0]
    # independently: sft.py's loss on the expert's demonstrations of the same 8 prompts
    task = load_task("add_noisy")
    model, tokenizer = load_model_and_tokenizer(sft_model, CPU, torch.float32)
    rows = task.prompts[rows_at(len(task.prompts), 0, 8, seed=1)]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    batch = encode_demonstrations(tokenizer, prompts, rows["expert"], tokenizer.eos_token_id, task.max_new_tokens)
    logprobs, _ = completion_logprobs(model, *batch)
    loss = sft.sft_loss(logprobs, batch[3], int(batch[3].sum()))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    assert logged["grad_share/expert"] == pytest.approx(1.0, abs=1e-6) and logged["mu"] == 1
    torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0).step()  # the same update, applied here
    trained = _weights("runs/mu1")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-6)  # Adam's first step: lr * sign(g)


def test_weighted_with_mu_0_is_grpos_loss_in_value_and_gradient(sft_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "2", "--num-prompts", "8", "--micro-batch-size", "32"]
    _mixed(sft_model, "--mode", "weighted", "--mu", "0", *flags, "--run-name", "mu0")
    grpo.main(grpo.parse_args(["--model", sft_model, *QUIET, *flags, "--run-name", "grpo"]))
    keys = ("reward", "loss", "grad_norm", "kl", "entropy", "completion_length")
    assert [[r[k] for k in keys] for r in _steps("mu0")] == [[r[k] for k in keys] for r in _steps("grpo")]
    assert all(r["grad_norm"] > 0 and r["grad_share/expert"] == 0 for r in _steps("mu0"))
    for name, value in _weights("runs/grpo").items():
        assert torch.equal(value, _weights("runs/mu0")[name]), name


def test_mu_schedules():
    args = srm.Args(mu=0.8, mu_schedule="linear", total_steps=4, mu_min=0.2)
    assert [srm.mu_at(s, args) for s in range(4)] == pytest.approx([0.65, 0.5, 0.35, 0.2])
    chord = srm.Args(mu=0.8, mu_schedule="chord", total_steps=6, mu_warmup_steps=2)
    assert [srm.mu_at(s, chord) for s in range(6)] == pytest.approx([0.4, 0.8, 0.6, 0.4, 0.2, 0.0])


# ---- luffy ---------------------------------------------------------------------------------------------


def test_luffy_expert_gradient_scale_follows_f_prime():
    """l = -A f(p), f(p) = p / (p + gamma): dl/dp = -A f'(p) = -A gamma / (p + gamma)^2, and through logp
    the token gets -A p f'(p); plain IS (f(p) = p) would give -A p, vanishing on tokens the model lacks."""
    gamma, A = 0.1, torch.tensor([[0.7], [-1.3]])
    p = torch.tensor([[0.001, 0.05, 0.5], [0.1, 0.9, 0.999]], dtype=torch.float64, requires_grad=True)
    srm.luffy_expert_loss(torch.log(p), A, gamma).sum().backward()
    f_prime = gamma / (p.detach() + gamma) ** 2
    torch.testing.assert_close(p.grad, -A * f_prime)
    logp = torch.log(p.detach()).requires_grad_()
    srm.luffy_expert_loss(logp, A, gamma).sum().backward()
    torch.testing.assert_close(logp.grad, -A * p.detach() * f_prime)
    shaping_over_is = f_prime  # (p f'(p)) / p: ~10x at p -> 0, ~0.08x at p = 1 (gamma = 0.1)
    assert shaping_over_is[0, 0] > 9.5 and shaping_over_is[1, 2] < 0.1


def test_luffy_advantages_come_from_the_mixed_group_of_g_plus_1(sft_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}
    originals = {name: getattr(srm, name) for name in ("generate_and_score", "compute_advantages",
                                                       "policy_token_loss", "luffy_expert_loss")}

    def record(name):
        def wrapped(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            seen.setdefault(name, []).append((args, out))
            return out
        return wrapped

    for name in originals:
        monkeypatch.setattr(srm, name, record(name))
    G, n = 4, 6
    _mixed(sft_model, "--mode", "luffy", "--total-steps", "1", "--num-prompts", str(n), "--group-size", str(G),
           "--beta", "0", "--run-name", "luffy")
    rollout = seen["generate_and_score"][0][1]
    mixed_call = [(a, out) for a, out in seen["compute_advantages"] if a[0].shape == (n, G + 1)]
    assert len(mixed_call) == 1
    rewards = mixed_call[0][0][0]  # (n, G + 1): the G samples, then the expert (always right here)
    assert torch.equal(rewards[:, :G], rollout.rewards.view(n, G)) and torch.all(rewards[:, G] == 1)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)  # independent
    # the update visits groups in a random order: compare each group's advantages as a set
    trained = torch.cat([a[2] for a, _ in seen["policy_token_loss"]]).view(n, G).sort(-1).values
    expert_trained = torch.cat([a[1] for a, _ in seen["luffy_expert_loss"]]).view(n)
    order = [min(range(n), key=lambda j: (trained[i] - expected[j, :G].sort().values).abs().sum()) for i in range(n)]
    torch.testing.assert_close(trained, expected[order, :G].sort(-1).values)
    torch.testing.assert_close(expert_trained.sort().values, expected[:, G].sort().values)
    assert (rollout.rewards.view(n, G).mean(1) < 1).any()  # some group had a wrong sample, so A_exp > 0 there
    assert expert_trained.max() > 0
    assert _steps("luffy")[0]["grad_norm/expert"] > 0


# ---- rft -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dedup", [False, True])
def test_rft_trains_on_exactly_the_accepted_samples(sft_model, tmp_path, monkeypatch, dedup):
    monkeypatch.chdir(tmp_path)
    sampled, trained = [], []
    original_generate, original_logprobs = srm.generate_and_score, srm.rollout_logprobs
    monkeypatch.setattr(srm, "generate_and_score", lambda *a, **k: sampled.append(original_generate(*a, **k))
                        or sampled[-1])

    def logprobs(model, batch, **kwargs):
        trained.extend(zip(batch.prompt_index.tolist(), batch.completions))  # rows the update differentiates
        return original_logprobs(model, batch, **kwargs)

    monkeypatch.setattr(srm, "rollout_logprobs", logprobs)
    _mixed(sft_model, "--mode", "rft", "--total-steps", "1", "--num-prompts", "8", "--beta", "0",
           "--micro-batch-size", "8", *([] if dedup else ["--no-rft-dedup"]), "--run-name", "rft")
    rollout = sampled[0]
    accepted = [(int(p), c) for p, c, ok in zip(rollout.prompt_index, rollout.completions,
                                                rollout.reward_terms["correct"]) if ok == 1]
    assert 0 < len(accepted) < len(rollout)  # the test means something: some rejected, some kept
    if dedup:
        assert sorted(trained) == sorted(set(accepted)) and len(set(accepted)) < len(accepted)
    else:
        assert sorted(trained) == sorted(accepted)
    # and the loss is sft.py's on those rows, computed independently from the starting weights
    model, _ = load_model_and_tokenizer(sft_model, CPU, torch.float32)
    rows, pairs = [], set()
    for i, pair in enumerate(zip(rollout.prompt_index.tolist(), rollout.completions)):
        if pair in set(accepted) and not (dedup and pair in pairs):
            rows.append(i)
            pairs.add(pair)
    kept = rollout[rows]
    logp, _ = completion_logprobs(model, kept.prompt_ids, kept.prompt_mask, kept.completion_ids, kept.completion_mask)
    expected = sft.sft_loss(logp, kept.completion_mask, int(kept.completion_mask.sum()))
    step = _steps("rft")[0]
    assert step["loss"] == pytest.approx(expected.item(), rel=1e-5)
    accepted = float(kept.completion_mask.sum() / rollout.completion_mask.sum())
    assert step["frac_tokens_accepted"] == pytest.approx(accepted)


# ---- distill -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["sampled", "full"])
def test_distill_against_itself_has_zero_gradient(sft_model, tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    _mixed(sft_model, "--mode", "distill", "--teacher", sft_model, "--distill-form", form, "--total-steps", "1",
           "--num-prompts", "8", "--run-name", "self")
    step = _steps("self")[0]
    # the same weights score the same tokens: A_t = 0 up to float rounding (MKL), so the gradient is ~0
    assert abs(step["loss"]) < 1e-5 and step["grad_norm"] < 1e-3 and abs(step["reverse_kl"]) < 1e-5


def test_distill_advantage_is_the_teachers_log_ratio_and_the_teacher_stays_frozen(sft_model, random_teacher,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen, loaded = {"micro": [], "advantages": []}, []
    original_logprobs, original_loss, original_load = (srm.rollout_logprobs, srm.policy_token_loss,
                                                       srm.load_model_and_tokenizer)
    monkeypatch.setattr(srm, "rollout_logprobs",
                        lambda model, batch, **k: seen["micro"].append(batch) or original_logprobs(model, batch, **k))
    monkeypatch.setattr(srm, "policy_token_loss",
                        lambda logp, old, adv, m, args: seen["advantages"].append(adv) or original_loss(logp, old, adv,
                                                                                                        m, args))
    monkeypatch.setattr(srm, "load_model_and_tokenizer",
                        lambda name, *a, **k: loaded.append((name, original_load(name, *a, **k))) or loaded[-1][1])
    _mixed(sft_model, "--mode", "distill", "--teacher", random_teacher, "--total-steps", "2", "--num-prompts", "4",
           "--group-size", "4", "--temperature", "0.7", "--run-name", "distill")
    # independently: plain full-sequence forwards (no shared prompt cache), log_softmax(z / T), gathered
    rollout = seen["micro"][0]  # step 1's one micro-batch, rows in the update's order
    student, _ = load_model_and_tokenizer(sft_model, CPU, torch.float32)
    teacher_copy, _ = load_model_and_tokenizer(random_teacher, CPU, torch.float32)

    def token_logprobs(model):
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float() / 0.7
        C = rollout.completion_ids.shape[1]
        return torch.log_softmax(logits[:, -C - 1:-1], -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        expected = (token_logprobs(teacher_copy) - token_logprobs(student)) * rollout.completion_mask
    got = torch.cat(seen["advantages"][:1])  # step 1, one micro-batch
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert expected.abs().max() > 0.5  # a different teacher: the test is not 0 == 0
    teacher = next(model for name, (model, _) in loaded if name == random_teacher)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, value in teacher_copy.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[name]), name
    assert all(r["grad_share/expert"] > 0.9 for r in _steps("distill"))  # beta's KL is the rest


# ---- shared invariances ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weighted", "luffy", "rft", "distill", "distill-full"])
def test_gradient_does_not_depend_on_micro_batch_size(sft_model, random_teacher, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "1", "--num-prompts", "8", "--mode", mode.split("-")[0]]
    if mode.startswith("distill"):
        flags += ["--teacher", random_teacher] + (["--distill-form", "full"] if mode.endswith("full") else [])
    _mixed(sft_model, *flags, "--run-name", "mb64", "--micro-batch-size", "64")
    _mixed(sft_model, *flags, "--run-name", "mb4", "--micro-batch-size", "4")  # < G: prompts not shared
    a, b = _steps("mb64")[0], _steps("mb4")[0]
    assert a["reward"] == b["reward"] and a["grad_norm"] > 0
    for key in ("loss", "grad_norm", "loss/expert", "grad_norm/expert"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("mode", ["weighted", "distill"])
def test_resume_continues_exactly(sft_model, random_teacher, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "6", "--save-every", "2", "--num-prompts", "4", "--mode", mode]
    flags += ["--mu-schedule", "chord", "--mu-warmup-steps", "3"] if mode == "weighted" else ["--teacher",
                                                                                              random_teacher]
    _mixed(sft_model, *flags, "--run-name", "straight")
    original = RunLogger.log
    with monkeypatch.context() as m:
        def log(self, s, metrics):
            if s == 5 and "event" not in metrics:
                raise KeyboardInterrupt
            return original(self, s, metrics)

        m.setattr(RunLogger, "log", log)
        with pytest.raises(KeyboardInterrupt):
            _mixed(sft_model, *flags, "--run-name", "resumed")
    _mixed(sft_model, *flags, "--run-name", "resumed", "--resume")
    straight, resumed = _steps("straight"), _steps("resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    keys = ("reward", "loss", "grad_norm", "loss/expert") + (("mu",) if mode == "weighted" else ())
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    for name, value in _weights("runs/straight").items():
        assert torch.equal(value, _weights("runs/resumed")[name]), name


# ---- errors: one line naming the flag ------------------------------------------------------------------


def _other_tokenizer_teacher(random_teacher, tmp_path):
    path = tmp_path / "other_tokenizer"
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    build_tiny_model(tokenizer, hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _other_task_teacher(random_teacher, tmp_path):
    path = tmp_path / "countdown_teacher"
    shutil.copytree(random_teacher, path)
    with open(path / "args.json", "w") as f:
        json.dump({"task": "countdown"}, f)
    return str(path)


@pytest.mark.parametrize("flags, expected", [
    (["--mode", "distill"], "error: --teacher: --mode distill needs a teacher folder"),
    (["--mode", "weighted", "--teacher", "x"], "error: --teacher: only --mode distill"),
    (["--mode", "distill", "--teacher", "./no-such-teacher"], "error: --teacher: ./no-such-teacher: no such folder"),
    (["--mode", "distill", "--teacher", "OTHER_TOKENIZER"], "has another tokenizer"),
    (["--mode", "distill", "--teacher", "OTHER_TASK"], "trained on task 'countdown', whose prompts are not"),
    (["--mode", "luffy", "--task", "countdown"], "error: --mode: luffy needs a task with an `expert` column"),
    (["--mode", "rft", "--luffy-gamma", "0.2"], "error: --luffy-gamma: belongs to --mode luffy"),
    (["--mode", "weighted", "--mu-min", "0.1"], "error: --mu-min: needs --mu-schedule linear or chord"),
    (["--mode", "luffy", "--group-size", "1"], "error: --group-size"),
])
def test_bad_sources_and_flags_fail_in_one_line(sft_model, random_teacher, tmp_path, monkeypatch, flags, expected):
    monkeypatch.chdir(tmp_path)
    flags = [_other_tokenizer_teacher(random_teacher, tmp_path) if f == "OTHER_TOKENIZER" else
             _other_task_teacher(random_teacher, tmp_path) if f == "OTHER_TASK" else f for f in flags]
    with pytest.raises(SystemExit) as stop:
        _mixed(sft_model, "--total-steps", "1", *flags)
    message = str(stop.value)
    assert expected in message and "\n" not in message, message
