"""The side-by-side comparison and the phenomena of the Chinese survey "rl与sft", each one command on a CPU.

    python benchmarks/experiments.py compare     # SFT, then every RL script from it, same budget (~15 min); (a)
    python benchmarks/experiments.py phenomena   # every token-level phenomenon on countdown_steps, 3 seeds (~90 min)
    python benchmarks/experiments.py phenomena --only entropy   # one of them (6-30 min; docs/phenomena.md):
        entropy       (b) entropy under GRPO vs Clip-Cov, KL-Cov, NSR, an entropy bonus, a higher temperature
        passk         (c) pass@1..64 of SFT vs GRPO: RL wins at k = 1, SFT catches up at large k
        forking       (d) the gradient on the top 20% entropy tokens / all / the bottom 80%
        signs         PSR / NSR / W-REINFORCE: pass@1..64 and entropy
        distill       (g) on-policy distillation vs GRPO: steps and CPU seconds to a better teacher's pass@1
        wrongref      (e) 20% wrong reference targets, and the wrong-vs-hard audit
        entropy_sign  does Cov(log pi, A) predict the sign of the next entropy change?
        dont, generalise, passk_training   (j), (i), (k)
        overopt       (l) GRPO on a learned reward model: proxy vs gold accuracy vs KL (add_noisy, ~25 min)
        prefs         (m) offline DPO, online DPO, GRPO at equal samples (add_noisy, ~16 min)
        tools         (n) SFT vs GRPO on the tool task tool_calc: does RL learn to call the tool? (~8 min)
    python benchmarks/experiments.py figures     # redraw docs/figures/curve_<script>.png from compare.json, no training

`compare` runs on add_noisy and holds phenomenon (a): RL goes past the noisy teacher; 200 more SFT
steps do not. `phenomena` runs on the reasoning task countdown_steps (benchmarks/reasoning_task.py
checks its properties): one SFT model, then every RL arm from it for seeds 1, 2 and 3, 100 steps
each, two runs at a time under one progress bar (elapsed, time left; each run's output in
runs/logs/). Knobs a method needs set for this task are set once in ARMS, with the reason, never
per seed. Every table cell is the mean over seeds with [min, max]; every figure draws the mean
and the min-max band. Each direction prints `holds` (every seed), `mixed` (some) or `DOES NOT
HOLD` (none) with the per-seed numbers; the command exits 1 unless every direction holds, so this
file is the check for each phenomenon and no exact number is pinned. Figures go to docs/figures/,
numbers to docs/figures/<name>.json. A finished run (its metrics.jsonl has an eval record) is
reused, so an interrupted command continues where it stopped (--fresh re-runs everything).
Evaluation: pass@k with 64 samples per prompt at T = 1 (unbiased), on 200 held-out prompts for
`compare` and 100 for `phenomena`, the same prompts for every seed.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common.tracking import read_metrics  # noqa: E402

FIGURES = os.path.join(REPO, "docs", "figures")
EVAL = ["--num-eval-samples", "64", "--no-tensorboard"]
SFT = "runs/cmp_sft"  # the shared starting point of every RL run of `compare`, `entropy`, `forking`, `noisy_refs`


# ---- running ----------------------------------------------------------------------------------------------


def finished(run: str) -> bool:
    path = os.path.join(REPO, run, "metrics.jsonl")
    return os.path.exists(path) and any(r.get("event") == "eval" for r in read_metrics(os.path.join(REPO, run)))


def run_all(plan: list[tuple], fresh: bool, jobs: int = 1):
    """plan: (run folder, command, expected seconds[, runs it needs first]). Runs what is not finished.

    jobs = 1 runs them in order with their own output. jobs > 1 runs that many at once, one thread each
    (OMP_NUM_THREADS=1), each run's output going to runs/logs/<run>.log, under one progress bar weighted by
    the expected seconds (elapsed and time left)."""
    from tqdm import tqdm

    plan = [(p[0], p[1], p[2], p[3] if len(p) > 3 else []) for p in plan]
    seen, todo = set(), []
    for run, cmd, expected, needs in plan:
        if run in seen:
            continue
        seen.add(run)
        if fresh or not finished(run):
            todo.append((run, cmd, expected, needs))
        else:
            print(f"reusing {run} (finished; --fresh re-runs it)")
    if not todo:
        return
    if jobs == 1:
        start, expected_done, actual_done = time.perf_counter(), 0.0, 0.0
        for i, (run, cmd, expected, _) in enumerate(todo):
            pace = actual_done / expected_done if expected_done else 1.0  # this machine vs the estimates
            left = pace * sum(t[2] for t in todo[i:])
            print(f"\n=== [{i + 1}/{len(todo)}] {run}: {' '.join(cmd[1:])}\n    elapsed "
                  f"{_mmss(time.perf_counter() - start)}, about {_mmss(left)} left", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True)
            actual_done, expected_done = actual_done + time.perf_counter() - t0, expected_done + expected
        print(f"\nall runs done in {_mmss(time.perf_counter() - start)}")
        return
    os.makedirs(os.path.join(REPO, "runs", "logs"), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running, waiting, failed = {}, list(todo), []
    bar = tqdm(total=sum(t[2] for t in todo), unit="s", desc=f"{len(todo)} runs, {jobs} at a time",
               bar_format="{desc}: {percentage:3.0f}%|{bar}| elapsed {elapsed}, about {remaining} left")
    while waiting or running:
        for run, (proc, expected, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[run]
                bar.update(expected)
                if proc.returncode:
                    failed.append(run)
                status = "FAILED" if proc.returncode else "done"
                bar.write(f"{status}: {run} (log runs/logs/{os.path.basename(run)}.log)")
        ready = [t for t in waiting if all(n not in running and all(n != w[0] for w in waiting) for n in t[3])]
        while ready and len(running) < jobs:
            run, cmd, expected, _ = ready.pop(0)
            waiting.remove(next(t for t in waiting if t[0] == run))
            log = open(os.path.join(REPO, "runs", "logs", f"{os.path.basename(run)}.log"), "w")
            running[run] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env), expected,
                            log)
        time.sleep(1)
    bar.close()
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)} (their logs are in runs/logs/)")


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def py(script: str, *flags: str) -> list[str]:
    return [sys.executable, script, *flags]


def eval_record(run: str) -> dict:
    return [r for r in read_metrics(os.path.join(REPO, run)) if r.get("event") == "eval"][-1]


def steps(run: str) -> list[dict]:
    return [r for r in read_metrics(os.path.join(REPO, run)) if "event" not in r]


def mean_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def plot(runs: list[str], labels: list[str], name: str, passk: bool = True, curves: bool = True):
    """docs/figures/<name>.png (training curves) and/or <name>_passk.png, drawn by common.plot."""
    from common.plot import load_runs, plot_compare, plot_passk

    os.makedirs(FIGURES, exist_ok=True)
    loaded = load_runs([os.path.join(REPO, r) for r in runs], labels)
    if curves:
        plot_compare(loaded, os.path.join(FIGURES, f"{name}.png"))
    if passk:
        plot_passk(loaded, os.path.join(FIGURES, f"{name}_passk.png"))


def figures():
    """docs/figures/curve_<script>.png, one per algorithm page, from the saved compare.json (no run folders needed)."""
    from common.plot import plot_learning_curves

    for path in plot_learning_curves(os.path.join(FIGURES, "compare.json"), FIGURES):
        print(f"learning curve written to {os.path.relpath(path, REPO)}")


def table(rows: list[tuple[str, str]], keys=("accuracy", "pass@1", "pass@8", "pass@64")) -> str:
    lines = ["| run | " + " | ".join("greedy" if k == "accuracy" else k for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for label, run in rows:
        e = eval_record(run)
        lines.append(f"| {label} (`{run}`) | " + " | ".join(f"{e.get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


class Checks:
    """Directions an experiment claims; each printed as holds / DOES NOT HOLD with its numbers."""

    def __init__(self):
        self.results = []

    def __call__(self, claim: str, holds: bool, numbers: str):
        self.results.append({"claim": claim, "holds": bool(holds), "numbers": numbers})
        print(f"  {'holds' if holds else 'DOES NOT HOLD'}: {claim} ({numbers})")

    @property
    def ok(self) -> bool:
        return all(r["holds"] for r in self.results)


def save(name: str, data: dict):
    os.makedirs(FIGURES, exist_ok=True)
    with open(os.path.join(FIGURES, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2)


def teacher_accuracy(task_name: str = "add_noisy") -> float:
    """The share of the task's demonstrations that are right: the ceiling imitation converges to."""
    from common.tasks import load_task

    train = load_task(task_name).train
    return sum(d == a for d, a in zip(train["demonstration"], train["answer"])) / len(train)


def sft_plan() -> tuple[str, list[str], float]:
    return (SFT, py("sft.py", "--run-name", "cmp_sft", *EVAL), 300)


# ---- experiments ------------------------------------------------------------------------------------------


def compare(fresh: bool) -> bool:
    """SFT, then each RL script and the mixed one from the same SFT model, 200 steps each; (a)."""
    rl = ["--model", SFT, "--total-steps", "200", *EVAL]
    plan = [sft_plan(),
            ("runs/cmp_sft_more", py("sft.py", "--model", SFT, "--run-name", "cmp_sft_more", "--total-steps", "200",
                                     "--learning-rate", "2e-4", "--warmup-steps", "0", *EVAL), 60),
            ("runs/cmp_grpo", py("grpo.py", "--run-name", "cmp_grpo", *rl), 50),
            ("runs/cmp_reinforce", py("reinforce.py", "--run-name", "cmp_reinforce", *rl), 50),
            ("runs/cmp_ppo", py("ppo.py", "--run-name", "cmp_ppo", *rl), 150),
            ("runs/cmp_sft_rl_mixed", py("sft_rl_mixed.py", "--run-name", "cmp_sft_rl_mixed", *rl), 70)]
    run_all(plan, fresh)
    rl_runs = ["runs/cmp_grpo", "runs/cmp_reinforce", "runs/cmp_ppo", "runs/cmp_sft_rl_mixed"]
    rl_labels = ["GRPO", "REINFORCE (RLOO)", "PPO", "SFT+RL (weighted)"]
    plot(rl_runs, rl_labels, "compare", passk=False)
    plot([SFT, "runs/cmp_sft_more", *rl_runs], ["SFT", "SFT +200 steps", *rl_labels], "compare", curves=False)
    rows = [("SFT 1200 steps", SFT), ("SFT +200 steps", "runs/cmp_sft_more"),
            *zip(rl_labels, rl_runs)]
    print("\n" + table(rows))
    print("\n| run | train seconds (sum of step_time) |\n|---|---:|")
    for label, run in rows:
        print(f"| {label} | {sum(r.get('step_time', 0) for r in steps(run)):.0f} |")
    teacher = teacher_accuracy()
    print(f"\n(a) the noisy teacher's demonstrations are right {teacher:.3f} of the time")
    check = Checks()
    sft, more, grpo = eval_record(SFT), eval_record("runs/cmp_sft_more"), eval_record("runs/cmp_grpo")
    check("(a) SFT's sampled pass@1 sits near the teacher's accuracy", abs(sft["pass@1"] - teacher) < 0.1,
          f"SFT pass@1 {sft['pass@1']:.3f}, teacher {teacher:.3f}")
    check("(a) GRPO goes past the teacher", grpo["pass@1"] > teacher + 0.1,
          f"GRPO pass@1 {grpo['pass@1']:.3f} vs teacher {teacher:.3f}")
    check("(a) 200 more SFT steps do not", more["pass@1"] < teacher + 0.1,
          f"SFT +200 pass@1 {more['pass@1']:.3f} vs teacher {teacher:.3f}")
    for label, run in zip(rl_labels, rl_runs):
        e = eval_record(run)
        check(f"{label} goes past the teacher", e["pass@1"] > teacher + 0.1, f"pass@1 {e['pass@1']:.3f}")
    keep = ("step", "sampled_accuracy", "reward", "eval_accuracy", "loss")  # each run's curve, for the algorithm pages
    save("compare", {"teacher_accuracy": teacher, "runs": {run: eval_record(run) for _, run in rows},
                     "curves": {run: [{k: r[k] for k in keep if k in r} for r in steps(run)] for _, run in rows},
                     "checks": check.results})
    figures()  # each algorithm page's curve, from the json just saved
    return check.ok


def entropy_fit(records: list[dict]) -> dict:
    """Least squares of R = -a exp(H) + b over a run's steps (H = entropy, R = sampled accuracy).

    >>> fit = entropy_fit([{"entropy": h, "sampled_accuracy": 2 - 0.5 * math.exp(h)} for h in (0.1, 0.3, 0.6)])
    >>> round(fit["a"], 6), round(fit["b"], 6), round(fit["r2"], 6)
    (0.5, 2.0, 1.0)
    """
    pts = [(math.exp(r["entropy"]), r["sampled_accuracy"]) for r in records
           if r.get("entropy") is not None and r.get("sampled_accuracy") is not None]
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else 0.0
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in pts)
    return {"a": -slope, "b": intercept, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


# ---- the phenomena on the reasoning task, over seeds --------------------------------------------------------

CDS_SFT = "runs/sft_countdown_steps"  # trained by benchmarks/reasoning_task.py; every run below starts from it
SEEDS = (1, 2, 3)
RL_STEPS = 100
CDS_EVAL = ["--num-eval-prompts", "100", "--num-eval-samples", "64", "--eval-every", "0", "--no-tensorboard"]
# Each arm: (script, flags, task, expected seconds per run on one core). Knobs set once for this task, never per seed:
# Clip-Cov / KL-Cov: the papers' ratios (2e-4, 2e-3) pick < 1 token of a ~4,000-token batch (their batches are
# ~1,000x larger); 0.005 and 0.05 keep their 1:10 ratio and touch ~20 / ~200 tokens, the order of one forking token
# per sampled completion. Entropy bonus 0.01: PPO's customary coefficient. Temperature 1.2: the kind of raise
# POLARIS and the survey use to keep exploring (evaluation stays at T = 1 for every arm).
ARMS = {
    "grpo": ("grpo.py", [], "countdown_steps", 200),
    "clip_cov": ("grpo.py", ["--cov-penalty", "clip_cov", "--clip-cov-frac", "0.005"], "countdown_steps", 210),
    # KL-Cov penalises |logp - logp_old|, which is 0 (gradient too) with one update per batch: it needs several, so
    # it runs with 4 minibatches (as grpo.py's ratio recipes do) against GRPO with 4 minibatches.
    "kl_cov_mb4": ("grpo.py", ["--cov-penalty", "kl_cov", "--kl-cov-frac", "0.05", "--num-minibatches", "4"],
                   "countdown_steps", 260),
    "grpo_mb4": ("grpo.py", ["--num-minibatches", "4"], "countdown_steps", 250),
    "ent_bonus": ("grpo.py", ["--ent-coef", "0.01"], "countdown_steps", 200),
    "temp": ("grpo.py", ["--temperature", "1.2"], "countdown_steps", 200),
    "nsr": ("reinforce.py", ["--baseline", "none", "--sign-weighting", "nsr"], "countdown_steps", 190),
    "psr": ("reinforce.py", ["--baseline", "none", "--sign-weighting", "psr"], "countdown_steps", 190),
    "w_reinforce": ("reinforce.py", ["--baseline", "none", "--sign-weighting", "w-reinforce"], "countdown_steps", 190),
    "top20": ("grpo.py", ["--top-entropy-rho", "0.2"], "countdown_steps", 210),
    "bottom80": ("grpo.py", ["--top-entropy-rho", "0.2", "--entropy-tokens", "bottom"], "countdown_steps", 210),
    "distill": ("sft_rl_mixed.py", ["--mode", "distill", "--teacher", "runs/ph_teacher"], "countdown_steps", 260),
    "wrongref20": ("grpo.py", [], "countdown_steps_wrongref20", 200),
}
TEACHER = ("runs/ph_teacher", py("grpo.py", "--model", CDS_SFT, "--task", "countdown_steps", "--run-name",
                                 "ph_teacher", "--seed", "0", "--total-steps", str(3 * RL_STEPS), *CDS_EVAL), 560)


def arm_runs(arm: str) -> list[str]:
    return [f"runs/ph_{arm}_s{seed}" for seed in SEEDS]


def arm_plan(*arms: str) -> list[tuple]:
    plan = []
    for arm in arms:
        script, flags, task, seconds = ARMS[arm]
        for seed, run in zip(SEEDS, arm_runs(arm)):
            cmd = py(script, "--model", CDS_SFT, "--task", task, "--run-name", os.path.basename(run), "--seed",
                     str(seed), "--total-steps", str(RL_STEPS), *CDS_EVAL, *flags)
            plan.append((run, cmd, seconds, ["runs/ph_teacher"] if arm == "distill" else []))
    return plan


def sft_evals() -> list[dict]:
    """The SFT model's eval record at each seed (the same model; the spread is the sampling's), cached in its folder."""
    import torch

    from common.evaluation import evaluate
    from common.models import load_model_and_tokenizer
    from common.tasks import load_task

    out = []
    for seed in SEEDS:
        path = os.path.join(REPO, CDS_SFT, f"eval_100x64_seed{seed}.json")
        if not os.path.exists(path):
            model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, CDS_SFT), torch.device("cpu"),
                                                        torch.float32)
            record = evaluate(model.eval(), tokenizer, load_task("countdown_steps"), 100, 64, seed=seed,
                              ks=range(1, 65))
            with open(path, "w") as f:
                json.dump(record, f)
        with open(path) as f:
            out.append(json.load(f))
    return out


def heldout_entropy(run: str, num_prompts: int = 100, samples: int = 8) -> float:
    """Mean per-token entropy at T = 1 of a model's samples on held-out prompts (cached in the run folder): the
    one entropy every arm can be compared on (a run at --temperature 1.2 logs the entropy of its tempered policy)."""
    import torch

    from common.logprobs import rollout_logprobs
    from common.models import load_model_and_tokenizer
    from common.rollout import generate_hf
    from common.tasks import format_prompt, load_task

    path = os.path.join(REPO, run, "heldout_entropy.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["entropy"]
    task = load_task("countdown_steps")
    model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"), torch.float32)
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in task.test["question"][:num_prompts]]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        rollout = generate_hf(model.eval(), tokenizer, prompts, samples, 1.0, task.max_new_tokens, 1.0,
                              [tokenizer.eos_token_id])
        _, entropy = rollout_logprobs(model, rollout, with_entropy=True)  # (B, C)
    value = entropy[rollout.completion_mask.bool()].mean().item()
    with open(path, "w") as f:
        json.dump({"entropy": value, "prompts": num_prompts, "samples": samples}, f)
    return value


def spread(values: list[float]) -> str:
    """'mean [min, max]' of per-seed values."""
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


class SeedChecks:
    """Directions over seeds: `holds` when every seed goes the claimed way, `mixed` when some do, else
    `DOES NOT HOLD`; each line prints the per-seed numbers."""

    def __init__(self):
        self.results = []

    def __call__(self, claim: str, per_seed: list[bool], numbers: str):
        n = sum(bool(x) for x in per_seed)
        verdict = "holds" if n == len(per_seed) else "mixed" if n else "DOES NOT HOLD"
        self.results.append({"claim": claim, "verdict": verdict, "seeds_holding": n, "seeds": len(per_seed),
                             "numbers": numbers})
        print(f"  {verdict} ({n}/{len(per_seed)} seeds): {claim} ({numbers})")

    @property
    def ok(self) -> bool:
        return all(r["verdict"] == "holds" for r in self.results)


def per_seed(arm: str, fn) -> list[float]:
    return [fn(run) for run in arm_runs(arm)]


def final(key: str):
    return lambda run: eval_record(run)[key]


def last_steps(key: str, n: int = 20):
    return lambda run: mean_of(steps(run)[-n:], key)


def first_steps(key: str, n: int = 10):
    return lambda run: mean_of(steps(run)[:n], key)


def plot_bands(groups: dict[str, list[str]], keys: list[tuple[str, str]], name: str, smooth: int = 10,
               x_key: str = "step", log_keys: tuple = ()):
    """docs/figures/<name>.png: per panel a step key, per group the mean over its seeds (trailing mean of `smooth`
    steps) with the min-max band; x_key "cpu" puts cumulative step_time on the x axis instead of the step."""
    from common.plot import STYLE, _pyplot, series

    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), dpi=100, squeeze=False)
        for ax, (key, title) in zip(axes[0], keys):
            for i, (label, runs) in enumerate(groups.items()):
                curves = [series(steps(r), key, smooth=smooth) for r in runs]
                n = min(len(c[0]) for c in curves)
                if n == 0:
                    continue
                xs = curves[0][0][:n]
                if x_key == "cpu":
                    xs = [sum(v) / len(v) for v in zip(*[series(steps(r), "step_time", cumulative=True)[1][:n]
                                                          for r in runs])]
                ys = [[c[1][j] for c in curves] for j in range(n)]
                ax.plot(xs, [sum(v) / len(v) for v in ys], color=f"C{i % 10}", label=label, linewidth=1.5)
                ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=f"C{i % 10}", alpha=0.2)
            ax.set_xlabel("CPU seconds of training (mean over seeds)" if x_key == "cpu" else "step")
            ax.set_title(title)
            if key in log_keys:
                ax.set_yscale("log")
        axes[0][0].legend(fontsize=9)
        fig.suptitle(f"mean of seeds {', '.join(map(str, SEEDS))}; band = min-max")
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, f"{name}.png"))
        plt.close(fig)


def plot_passk_bands(groups: dict[str, list[dict]], name: str, task: str = "countdown_steps", prompts: int = 100):
    """docs/figures/<name>.png: pass@k for k = 1..64 (log2 axis), mean over seeds and the min-max band."""
    from common.plot import STYLE, _pyplot, passk_points

    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
        for i, (label, records) in enumerate(groups.items()):
            curves = [passk_points(r) for r in records]
            ks = curves[0][0]
            ys = [[c[1][j] for c in curves] for j in range(len(ks))]
            ax.plot(ks, [sum(v) / len(v) for v in ys], color=f"C{i % 10}", label=label, linewidth=1.5)
            ax.fill_between(ks, [min(v) for v in ys], [max(v) for v in ys], color=f"C{i % 10}", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32, 64], ["1", "2", "4", "8", "16", "32", "64"])
        ax.minorticks_off()
        ax.set_xlabel("k (samples per prompt, log2 scale)")
        ax.set_ylabel(f"pass@k (unbiased, T = 1, {prompts} held-out problems)")
        ax.set_title(f"{task}, mean of seeds {', '.join(map(str, SEEDS))}; band = min-max")
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, f"{name}.png"))
        plt.close(fig)


def arm_table(arms: dict[str, str], columns: dict[str, object], sft: dict | None = None) -> str:
    """A markdown table: one row per arm, each cell 'mean [min, max]' over the seeds."""
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    if sft is not None:
        lines.append("| SFT model (one model; spread = eval sampling) | " +
                     " | ".join(spread(sft[c]) if c in sft else "-" for c in columns) + " |")
    for arm, label in arms.items():
        lines.append(f"| {label} (`runs/ph_{arm}_s*`) | " +
                     " | ".join(spread(per_seed(arm, fn)) for fn in columns.values()) + " |")
    return "\n".join(lines)


def entropy(fresh: bool) -> bool:
    """(b) Cui et al. 2025: entropy falls under GRPO; Clip-Cov / KL-Cov / NSR / an entropy bonus / a higher
    temperature each try to hold it up. Entropy compared at T = 1 on held-out prompts, after training."""
    arms = {"grpo": "GRPO", "clip_cov": "Clip-Cov", "nsr": "NSR (reinforce.py)", "ent_bonus": "entropy bonus 0.01",
            "temp": "rollout temperature 1.2", "grpo_mb4": "GRPO, 4 minibatches", "kl_cov_mb4": "KL-Cov, 4 minibatches"}
    baseline = {arm: "grpo_mb4" if arm == "kl_cov_mb4" else "grpo" for arm in arms}  # like against like
    run_all(arm_plan(*arms), fresh, jobs=2)
    sft_h = heldout_entropy(CDS_SFT)
    columns = {"held-out entropy, T = 1": heldout_entropy, "logged entropy, first 10 steps": first_steps("entropy"),
               "last 20": last_steps("entropy"), "pass@1": final("pass@1"), "pass@64": final("pass@64")}
    print(f"\nSFT model: held-out entropy {sft_h:.3f}\n" + arm_table(arms, columns))
    plot_bands({label: arm_runs(arm) for arm, label in arms.items()},
               [("entropy", "entropy of the sampling policy (logged, per step)"),
                ("sampled_accuracy", "sampled pass@1 of the rollouts")], "ph_entropy")
    grpo_runs = arm_runs("grpo")
    fits = [entropy_fit(steps(r)) for r in grpo_runs]
    check = SeedChecks()
    g_h = per_seed("grpo", heldout_entropy)
    check("(b) GRPO's entropy falls below the SFT model's", [h < sft_h for h in g_h],
          f"held-out entropy {sft_h:.3f} -> {spread(g_h)}")
    for arm in [a for a in arms if a not in ("grpo", "grpo_mb4")]:
        base = baseline[arm]
        h, p1 = per_seed(arm, heldout_entropy), per_seed(arm, final("pass@1"))
        b_h, b_p1 = per_seed(base, heldout_entropy), per_seed(base, final("pass@1"))
        check(f"(b) {arms[arm]} keeps entropy above {arms[base]}'s", [a > b for a, b in zip(h, b_h)],
              f"{spread(h)} vs {spread(b_h)}")
        check(f"(b) {arms[arm]} at similar reward (pass@1 within 0.03 of {arms[base]}'s or above)",
              [a >= b - 0.03 for a, b in zip(p1, b_p1)], f"pass@1 {spread(p1)} vs {spread(b_p1)}")
    check("(b) R = -a exp(H) + b fits GRPO's run (a > 0, R^2 > 0.5)", [f["a"] > 0 and f["r2"] > 0.5 for f in fits],
          "a " + ", ".join(f"{f['a']:.2f}" for f in fits) + "; R^2 " + ", ".join(f"{f['r2']:.2f}" for f in fits))
    save("ph_entropy", {"sft_heldout_entropy": sft_h, "arms": {arm: {"label": label, **{
        c: per_seed(arm, fn) for c, fn in columns.items()}} for arm, label in arms.items()},
        "grpo_fits": fits, "checks": check.results})
    return check.ok


def passk(fresh: bool) -> bool:
    """(c) Yue et al. 2025: RL wins pass@1; the SFT model catches up as k grows (k = 1..64)."""
    run_all(arm_plan("grpo"), fresh, jobs=2)
    sft, rl = sft_evals(), [eval_record(r) for r in arm_runs("grpo")]
    ks = (1, 4, 16, 64)
    print("\n| model | " + " | ".join(f"pass@{k}" for k in ks) + " |\n|---|" + "---:|" * len(ks))
    for label, records in (("SFT", sft), ("GRPO", rl)):
        print(f"| {label} | " + " | ".join(spread([r[f"pass@{k}"] for r in records]) for k in ks) + " |")
    plot_passk_bands({"SFT (one model; band = eval sampling)": sft, "GRPO from it": rl}, "ph_passk")
    ks_both = (1, 2, 4, 8, 16, 32, 64)  # the RL runs' eval records hold powers of two
    cross = [next((k for k in ks_both if s[f"pass@{k}"] >= r[f"pass@{k}"]), None) for s, r in zip(sft, rl)]
    check = SeedChecks()
    check("(c) RL wins at k = 1", [r["pass@1"] > s["pass@1"] for s, r in zip(sft, rl)],
          f"GRPO {spread([r['pass@1'] for r in rl])} vs SFT {spread([s['pass@1'] for s in sft])}")
    check("(c) SFT catches up or wins at k = 64", [s["pass@64"] >= r["pass@64"] for s, r in zip(sft, rl)],
          f"SFT {spread([s['pass@64'] for s in sft])} vs GRPO {spread([r['pass@64'] for r in rl])}")
    check("(c) RL's lead shrinks as k grows", [r["pass@64"] - s["pass@64"] < r["pass@1"] - s["pass@1"]
                                               for s, r in zip(sft, rl)],
          "first k where SFT >= GRPO, per seed: " + ", ".join(str(c) for c in cross))
    save("ph_passk", {"sft": sft, "grpo": rl, "crossover_k": cross, "checks": check.results})
    return check.ok


def forking(fresh: bool) -> bool:
    """(d) Wang et al. 2025: the gradient on the top 20% highest-entropy tokens vs all tokens vs the bottom 80%."""
    arms = {"top20": "top 20% by entropy", "grpo": "all tokens", "bottom80": "bottom 80%"}
    run_all(arm_plan(*arms), fresh, jobs=2)
    columns = {"greedy": final("accuracy"), "pass@1": final("pass@1"), "pass@8": final("pass@8"),
               "pass@64": final("pass@64")}
    print("\n" + arm_table(arms, columns, {k: [e[v] for e in sft_evals()] for k, v in
                                           (("greedy", "accuracy"), ("pass@1", "pass@1"), ("pass@8", "pass@8"),
                                            ("pass@64", "pass@64"))}))
    plot_bands({label: arm_runs(arm) for arm, label in arms.items()},
               [("sampled_accuracy", "sampled pass@1 of the rollouts"), ("entropy", "entropy (logged)")],
               "ph_forking")
    top, every, bottom = (per_seed(a, final("pass@1")) for a in arms)
    check = SeedChecks()
    check("(d) the top 20% alone learns about as well as all tokens (pass@1 within 0.02 or above)",
          [t >= a - 0.02 for t, a in zip(top, every)], f"{spread(top)} vs {spread(every)}")
    check("(d) the bottom 80% alone learns less than all tokens", [b < a for b, a in zip(bottom, every)],
          f"{spread(bottom)} vs {spread(every)}")
    save("ph_forking", {"arms": {a: per_seed(a, final("pass@1")) for a in arms}, "checks": check.results})
    return check.ok


def signs(fresh: bool) -> bool:
    """Zhu et al. 2025: positive samples only (PSR) sharpen and narrow; negatives only (NSR) keep pass@k at large
    k and the entropy; W-REINFORCE (lambda = 0.1 on positives) sits between."""
    arms = {"psr": "PSR", "nsr": "NSR", "w_reinforce": "W-REINFORCE (lambda 0.1)", "grpo": "GRPO"}
    run_all(arm_plan(*arms), fresh, jobs=2)
    sft = sft_evals()
    columns = {"pass@1": final("pass@1"), "pass@8": final("pass@8"), "pass@64": final("pass@64"),
               "held-out entropy": heldout_entropy}
    print("\n" + arm_table(arms, columns, {f"pass@{k}": [e[f"pass@{k}"] for e in sft] for k in (1, 8, 64)}))
    plot_passk_bands({"SFT": sft, **{label: [eval_record(r) for r in arm_runs(arm)] for arm, label in arms.items()}},
                     "ph_signs_passk")
    p1 = {a: per_seed(a, final("pass@1")) for a in arms}
    p64 = {a: per_seed(a, final("pass@64")) for a in arms}
    h = {a: per_seed(a, heldout_entropy) for a in arms}
    s1, s64 = [e["pass@1"] for e in sft], [e["pass@64"] for e in sft]
    check = SeedChecks()
    check("PSR's entropy ends below NSR's", [a < b for a, b in zip(h["psr"], h["nsr"])],
          f"{spread(h['psr'])} vs {spread(h['nsr'])}")
    check("NSR's pass@64 is above PSR's", [a > b for a, b in zip(p64["nsr"], p64["psr"])],
          f"{spread(p64['nsr'])} vs {spread(p64['psr'])}")
    check("NSR keeps the SFT model's pass@64 (within 0.02 or above)", [a >= b - 0.02 for a, b in zip(p64["nsr"], s64)],
          f"{spread(p64['nsr'])} vs SFT {spread(s64)}")
    for arm in ("psr", "nsr", "w_reinforce"):
        check(f"{arms[arm]} raises pass@1 above the SFT model's", [a > b for a, b in zip(p1[arm], s1)],
              f"{spread(p1[arm])} vs SFT {spread(s1)}")
    save("ph_signs", {"pass@1": p1, "pass@64": p64, "heldout_entropy": h, "sft": sft, "checks": check.results})
    return check.ok


def distill(fresh: bool) -> bool:
    """(g) On-policy distillation (sft_rl_mixed.py --mode distill) vs GRPO: steps and CPU seconds to the teacher's
    pass@1. The teacher is GRPO trained 3x as long (300 steps, seed 0), better than where 100 GRPO steps end."""
    run_all([(*TEACHER, []), *arm_plan("grpo", "distill")], fresh, jobs=2)
    # the yardstick is the curves' own: sampled pass@1 on training prompts (a trailing mean), held-out pass@1 beside it
    target = mean_of(steps(TEACHER[0])[-20:], "sampled_accuracy")  # the teacher's, over its last 20 steps

    def reach(run: str, level: float | None = None, window: int = 10) -> tuple[int | None, float | None]:
        """First step whose trailing mean (window steps) of sampled pass@1 reaches `level` (the teacher's), and the
        CPU seconds of training up to it."""
        level = target if level is None else level
        s = steps(run)
        _, acc = series(s, "sampled_accuracy", smooth=window)
        _, cpu = series(s, "step_time", cumulative=True)
        i = next((i for i, a in enumerate(acc) if i >= window - 1 and a >= level), None)
        return (None, None) if i is None else (s[i]["step"], cpu[i])

    from common.plot import series

    arms = {"grpo": "GRPO", "distill": "on-policy distillation"}
    print(f"\nteacher (`{TEACHER[0]}`): sampled pass@1 over its last 20 steps {target:.3f}, held-out pass@1 "
          f"{eval_record(TEACHER[0])['pass@1']:.3f}\n\n| run | held-out pass@1 | steps to the teacher's sampled "
          "pass@1 | CPU s to it | CPU s per step |\n|---|---:|---:|---:|---:|")
    result = {}
    for arm, label in arms.items():
        reached = [reach(r) for r in arm_runs(arm)]
        p1 = per_seed(arm, final("pass@1"))
        per_step = per_seed(arm, lambda r: mean_of(steps(r), "step_time"))
        result[arm] = {"pass@1": p1, "reached": reached, "step_seconds": per_step}
        print(f"| {label} | {spread(p1)} | {', '.join(str(s) if s else 'never' for s, _ in reached)} | "
              f"{', '.join(f'{c:.0f}' if c else '-' for _, c in reached)} | {spread(per_step)} |")
    plot_bands({"teacher (one run)": [TEACHER[0]], **{label: arm_runs(arm) for arm, label in arms.items()}},
               [("sampled_accuracy", "sampled pass@1 of the rollouts")], "ph_distill", x_key="cpu")
    g_end = result["grpo"]["pass@1"]
    inf = float("inf")
    # a level both can reach in 100 steps: where GRPO ends (its sampled pass@1 over the last 20 steps, mean of seeds)
    halfway = sum(per_seed("grpo", last_steps("sampled_accuracy"))) / len(SEEDS)
    for arm in arms:
        result[arm]["reached_grpo_end"] = [reach(r, halfway) for r in arm_runs(arm)]
    print(f"\nsteps (CPU s) to GRPO's final sampled pass@1 {halfway:.3f}: " + "; ".join(
        f"{arms[a]} " + ", ".join(f"{s} ({c:.0f})" if s else "never" for s, c in result[a]["reached_grpo_end"])
        for a in arms))
    check = SeedChecks()
    t_end = eval_record(TEACHER[0])["pass@1"]
    check("(g) the teacher is better than where GRPO ends (held-out pass@1)", [t_end > g for g in g_end],
          f"teacher {t_end:.3f} vs GRPO {spread(g_end)}")
    check("(g) distillation reaches the teacher's pass@1 in fewer CPU seconds than GRPO",
          [(d[1] or inf) < (g[1] or inf) for d, g in zip(result["distill"]["reached"], result["grpo"]["reached"])],
          "CPU s per seed, distill vs GRPO: " + "; ".join(
              f"{d[1] or inf:.0f} vs {g[1] or inf:.0f}" for d, g in zip(result["distill"]["reached"],
                                                                       result["grpo"]["reached"])))
    check("(g) distillation reaches where GRPO ends in fewer CPU seconds than GRPO",
          [(d[1] or inf) < (g[1] or inf) for d, g in zip(result["distill"]["reached_grpo_end"],
                                                         result["grpo"]["reached_grpo_end"])],
          "; ".join(f"{d[1] or inf:.0f} vs {g[1] or inf:.0f}" for d, g in zip(result["distill"]["reached_grpo_end"],
                                                                             result["grpo"]["reached_grpo_end"])))
    check("(g) distillation ends at a higher pass@1 than GRPO", [d > g for d, g in
                                                                 zip(result["distill"]["pass@1"], g_end)],
          f"{spread(result['distill']['pass@1'])} vs {spread(g_end)}")
    save("ph_distill", {"teacher_pass@1": target, **result, "checks": check.results})
    return check.ok


def wrongref(fresh: bool) -> bool:
    """(e) 20% of the training problems with a wrong reference target: what it costs, what RL learns on them, and
    the audit that tells a wrong reference (samples agree, never match) from a hard prompt (samples disagree)."""
    import torch

    from benchmarks.reference_audit import audit, summary
    from common.models import load_model_and_tokenizer
    from common.tasks import load_task

    run_all(arm_plan("grpo", "wrongref20"), fresh, jobs=2)
    task = load_task("countdown_steps_wrongref20")
    results = {}
    for arm in ("grpo", "wrongref20"):
        for run in arm_runs(arm):
            path = os.path.join(REPO, run, "reference_audit.json")
            if not os.path.exists(path):
                model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"),
                                                            torch.float32)
                records = audit(model, tokenizer, task, num_prompts=300, samples=16, agree=0.5, rarely=0.25)
                wrong = [r for r in records if not r["reference_is_right"]]
                with open(path, "w") as f:
                    json.dump({"summary": summary(records), "follows_wrong": mean_of(wrong, "right_share"),
                               "true_target": mean_of(wrong, "truth_share"), "wrong": len(wrong)}, f)
            with open(path) as f:
                results[run] = json.load(f)
    print("\n| references | clean test pass@1 | zero-std groups, last 50 steps | on wrong-reference prompts: "
          "samples right by the wrong reference | ending at the true target | flagged: precision / recall |\n"
          "|---|---:|---:|---:|---:|---:|")
    rows = {}
    for arm, label in (("grpo", "all right"), ("wrongref20", "20% wrong")):
        rs = arm_runs(arm)
        rows[arm] = {"pass@1": per_seed(arm, final("pass@1")),
                     "zero_std": per_seed(arm, last_steps("frac_zero_std_groups", 50)),
                     "follows_wrong": [results[r]["follows_wrong"] for r in rs],
                     "true_target": [results[r]["true_target"] for r in rs],
                     "precision": [results[r]["summary"]["precision"] or 0.0 for r in rs],
                     "recall": [results[r]["summary"]["recall"] or 0.0 for r in rs]}
        v = rows[arm]
        print(f"| {label} | {spread(v['pass@1'])} | {spread(v['zero_std'])} | {spread(v['follows_wrong'])} | "
              f"{spread(v['true_target'])} | {spread(v['precision'])} / {spread(v['recall'])} |")
    plot_bands({"all references right": arm_runs("grpo"), "20% wrong": arm_runs("wrongref20")},
               [("sampled_accuracy", "sampled pass@1 (against the references the run was given)"),
                ("frac_zero_std_groups", "groups without signal")], "ph_wrongref")
    clean, dirty = rows["grpo"], rows["wrongref20"]
    check = SeedChecks()
    check("(e) wrong references cost clean test pass@1", [d < c for d, c in zip(dirty["pass@1"], clean["pass@1"])],
          f"{spread(dirty['pass@1'])} vs {spread(clean['pass@1'])}")
    check("(e) RL on them satisfies the wrong reference more than the clean run does",
          [d > c for d, c in zip(dirty["follows_wrong"], clean["follows_wrong"])],
          f"{spread(dirty['follows_wrong'])} vs {spread(clean['follows_wrong'])}")
    check("(e) the audit finds wrong references (precision > 0.5, recall > 0.3)",
          [p > 0.5 and r > 0.3 for p, r in zip(dirty["precision"], dirty["recall"])],
          f"precision {spread(dirty['precision'])}, recall {spread(dirty['recall'])}")
    save("ph_wrongref", {"runs": rows, "checks": check.results})
    return check.ok


def entropy_sign(fresh: bool) -> bool:
    """The article's diagnostic: does sign(-Cov(log pi, A)) at step t (Cui et al.'s first-order prediction) match
    sign(entropy at t+1 - entropy at t)? Read from the GRPO runs' tokens/cov_logp_adv; a rate near 0.5 is chance."""
    run_all(arm_plan("grpo"), fresh, jobs=2)
    out = []
    for seed, run in zip(SEEDS, arm_runs("grpo")):
        rows = [r for r in steps(run) if r.get("entropy") is not None]
        pairs = [(-a["tokens/cov_logp_adv"], b["entropy"] - a["entropy"]) for a, b in zip(rows, rows[1:])]
        out.append({"seed": seed, "sign_match": sum((p > 0) == (m > 0) for p, m in pairs) / len(pairs),
                    "cov_mean": -sum(p for p, _ in pairs) / len(pairs),
                    "entropy_first": rows[0]["entropy"], "entropy_last": rows[-1]["entropy"]})
        print(f"  seed {seed}: the sign matches at {out[-1]['sign_match']:.2f} of {len(pairs)} steps; mean Cov "
              f"{out[-1]['cov_mean']:+.4f}; entropy {rows[0]['entropy']:.3f} -> {rows[-1]['entropy']:.3f}")
    check = SeedChecks()
    check("the sign of the next entropy change is predicted better than chance (> 0.55)",
          [o["sign_match"] > 0.55 for o in out], ", ".join(f"{o['sign_match']:.2f}" for o in out))
    check("over the run, a positive mean Cov(log pi, A) comes with falling entropy",
          [(o["cov_mean"] > 0) == (o["entropy_last"] < o["entropy_first"]) for o in out],
          "; ".join(f"Cov {o['cov_mean']:+.4f}, dH {o['entropy_last'] - o['entropy_first']:+.3f}" for o in out))
    save("ph_entropy_sign", {"seeds": out, "checks": check.results})
    return check.ok


PHENOMENA = {"entropy": entropy, "passk": passk, "forking": forking, "signs": signs, "distill": distill,
             "wrongref": wrongref, "entropy_sign": entropy_sign}

# ---- three lessons with no experiment before: "don't", memorise vs generalise, pass@k as the objective ------

SFT_MORE = ["--learning-rate", "2e-4", "--warmup-steps", "0", "--batch-size", "64"]  # continue from CDS_SFT
EVAL16 = ["--num-eval-samples", "16"]  # pass@1 and the violation rate need no k = 64
ARMS.update({
    # (j) "don't": the start model multiplies; the teacher of countdown_steps_nomul never does, and no prompt says so.
    # 1x = the 12,800 samples of 100 RL steps (200 steps of 64 demonstrations), 2x, 4x.
    "nomul_sft1x": ("sft.py", [*SFT_MORE, "--total-steps", "200", *EVAL16], "countdown_steps_nomul", 60),
    "nomul_sft2x": ("sft.py", [*SFT_MORE, "--total-steps", "400", *EVAL16], "countdown_steps_nomul", 110),
    "nomul_sft4x": ("sft.py", [*SFT_MORE, "--total-steps", "800", *EVAL16], "countdown_steps_nomul", 210),
    "nomul_grpo": ("grpo.py", EVAL16, "countdown_steps_nomul", 190),
    "nomul_nsr": ("reinforce.py", ["--baseline", "none", "--sign-weighting", "nsr", *EVAL16], "countdown_steps_nomul",
                  180),
    # (i) SFT for longer at about GRPO's CPU (400 SFT steps ~ 100 GRPO steps here), then both tested out of distribution
    "sft_longer": ("sft.py", [*SFT_MORE, "--total-steps", "400"], "countdown_steps", 130),
    # (k) pass@k as the objective; k = 16 needs groups of 16 (8 prompts x 16: the same 128 samples a step)
    "passk4": ("grpo.py", ["--advantage", "passk", "--passk-k", "4"], "countdown_steps", 200),
    "passk16": ("grpo.py", ["--advantage", "passk", "--passk-k", "16", "--group-size", "16", "--num-prompts", "8"],
                "countdown_steps", 210),
})


def sample_stats(run: str, task_name: str, num_prompts: int = 100, samples: int = 16) -> dict:
    """Sampled (T = 1) accuracy by the plain countdown_steps verifier, and the share of samples with a product, on
    held-out problems of task_name; cached in the run folder."""
    import torch

    from common.models import load_model_and_tokenizer
    from common.rewards import countdown_steps_verifier
    from common.rollout import generate_hf
    from common.tasks import format_prompt, load_task

    path = os.path.join(REPO, run, f"samples_{task_name}.json")
    if not os.path.exists(path):
        task = load_task(task_name)
        model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"), torch.float32)
        test = task.test.select(range(num_prompts))
        prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in test["question"]]
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            out = generate_hf(model.eval(), tokenizer, prompts, samples, 1.0, task.max_new_tokens, 1.0,
                              [tokenizer.eos_token_id])
        answers = [test["answer"][i] for i in out.prompt_index.tolist()]
        right = [countdown_steps_verifier(c, a)[0] for c, a in zip(out.completions, answers)]
        uses_product = ["*" in c for c in out.completions]
        with open(path, "w") as f:
            json.dump({"accuracy_any_op": sum(right) / len(right), "violation": sum(uses_product) / len(right),
                       "right_without_product": sum(r and not p for r, p in zip(right, uses_product)) / len(right)},
                      f)
    with open(path) as f:
        return json.load(f)


def dont(fresh: bool) -> bool:
    """(j) SFT only ever says what is acceptable; "don't" has to be inferred from what the demonstrations leave out.
    From the SFT model (which multiplies), SFT on 1x / 2x / 4x no-product demonstrations vs RL whose reward counts a
    product as wrong (GRPO), and NSR alone: how fast each removes the product it was never told to avoid."""
    arms = {"nomul_sft1x": "SFT, 1x demonstrations (200 steps)", "nomul_sft2x": "SFT, 2x (400 steps)",
            "nomul_sft4x": "SFT, 4x (800 steps)", "nomul_grpo": "GRPO, product = wrong", "nomul_nsr": "NSR alone"}
    run_all(arm_plan(*arms), fresh, jobs=2)
    start = sample_stats(CDS_SFT, "countdown_steps_nomul")
    columns = {"violation (samples with *)": lambda r: sample_stats(r, "countdown_steps_nomul")["violation"],
               "pass@1, product = wrong": final("pass@1"),
               "accuracy, any operator": lambda r: sample_stats(r, "countdown_steps_nomul")["accuracy_any_op"],
               "CPU s of training": lambda r: sum(x.get("step_time", 0) for x in steps(r))}
    print(f"\nstart (`{CDS_SFT}`): violation {start['violation']:.3f}, accuracy any operator "
          f"{start['accuracy_any_op']:.3f}, right without a product {start['right_without_product']:.3f}\n"
          + arm_table(arms, columns))
    v = {a: per_seed(a, columns["violation (samples with *)"]) for a in arms}
    check = SeedChecks()
    check("(j) more positive demonstrations squeeze the violations (4x below 1x)",
          [a < b for a, b in zip(v["nomul_sft4x"], v["nomul_sft1x"])], f"{spread(v['nomul_sft4x'])} vs "
          f"{spread(v['nomul_sft1x'])}")
    for arm in ("nomul_grpo", "nomul_nsr"):
        check(f"(j) {arms[arm]} removes more violations than SFT on 4x as many samples",
              [a < b for a, b in zip(v[arm], v["nomul_sft4x"])], f"{spread(v[arm])} vs {spread(v['nomul_sft4x'])}")
    plot_bands({label: arm_runs(arm) for arm, label in arms.items() if not arm.startswith("nomul_sft")},
               [("sampled_accuracy", "sampled pass@1 (a product counts as wrong)"),
                ("entropy", "entropy (logged)")], "ph_dont")
    save("ph_dont", {"start": start, "arms": {a: {c: per_seed(a, fn) for c, fn in columns.items()} for a in arms},
                     "checks": check.results})
    return check.ok


def generalise(fresh: bool) -> bool:
    """(i) Chu et al. 2025: SFT memorises, RL generalises. Both from the SFT model at about equal CPU (SFT 400 more
    steps, GRPO 100 steps), tested in distribution and on numbers up to 40 (training saw up to 25); one more number
    than training showed is reported too."""
    import torch

    from common.evaluation import evaluate
    from common.models import load_model_and_tokenizer
    from common.tasks import load_task

    run_all(arm_plan("grpo", "sft_longer"), fresh, jobs=2)

    def shifted(run: str, task_name: str = "countdown_steps_to40") -> dict:  # held-out eval on a shifted test
        path = os.path.join(REPO, run, f"eval_{task_name}.json")
        if not os.path.exists(path):
            model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"), torch.float32)
            with open(path, "w") as f:
                json.dump(evaluate(model.eval(), tokenizer, load_task(task_name), 100, 16), f)
        with open(path) as f:
            return json.load(f)

    ood = shifted  # the verdicts read numbers up to 40; one more number is the floor below (every model: 0)
    base_ood = ood(CDS_SFT)
    sft = sft_evals()
    columns = {"in distribution pass@1": final("pass@1"), "pass@16": final("pass@16"),
               "numbers to 40 pass@1": lambda r: ood(r)["pass@1"], "pass@16 ": lambda r: ood(r)["pass@16"],
               "4 numbers pass@1": lambda r: shifted(r, "countdown_steps_4numbers")["pass@1"],
               "CPU s of training": lambda r: sum(x.get("step_time", 0) for x in steps(r))}
    arms = {"sft_longer": "SFT, 400 more steps", "grpo": "GRPO, 100 steps"}
    print("\n" + arm_table(arms, columns, {"in distribution pass@1": [e["pass@1"] for e in sft],
                                           "pass@16": [e["pass@16"] for e in sft],
                                           "numbers to 40 pass@1": [base_ood["pass@1"]] * 3,
                                           "pass@16 ": [base_ood["pass@16"]] * 3,
                                           "4 numbers pass@1": [shifted(CDS_SFT, "countdown_steps_4numbers")["pass@1"]]
                                           * 3}))
    gain = {a: ([final("pass@1")(r) - s["pass@1"] for r, s in zip(arm_runs(a), sft)],
                [ood(r)["pass@1"] - base_ood["pass@1"] for r in arm_runs(a)]) for a in arms}
    check = SeedChecks()
    for arm in arms:
        check(f"(i) {arms[arm]} gains in distribution", [g > 0 for g in gain[arm][0]], spread(gain[arm][0]))
        check(f"(i) {arms[arm]} gains with numbers to 40", [g > 0 for g in gain[arm][1]], spread(gain[arm][1]))
    check("(i) RL's out-of-distribution gain is larger than SFT's",
          [r > s for r, s in zip(gain["grpo"][1], gain["sft_longer"][1])],
          f"GRPO {spread(gain['grpo'][1])} vs SFT {spread(gain['sft_longer'][1])}")
    save("ph_generalise", {"start_ood": base_ood, "gains": gain, "arms": {a: {c: per_seed(a, fn) for c, fn in
                                                                              columns.items()} for a in arms},
                           "checks": check.results})
    return check.ok


def passk_training(fresh: bool) -> bool:
    """(k) Chen et al. 2025: optimise pass@k (grpo.py --advantage passk) instead of pass@1, k = 4 and 16, against
    GRPO from the same SFT model: does pass@64 stay at the SFT model's while pass@1 still rises?"""
    arms = {"grpo": "GRPO (pass@1)", "passk4": "pass@4 training", "passk16": "pass@16 training (G = 16)"}
    run_all(arm_plan(*arms), fresh, jobs=2)
    sft = sft_evals()
    columns = {"pass@1": final("pass@1"), "pass@4": final("pass@4"), "pass@16": final("pass@16"),
               "pass@64": final("pass@64"), "held-out entropy": heldout_entropy}
    print("\n" + arm_table(arms, columns, {f"pass@{k}": [e[f"pass@{k}"] for e in sft] for k in (1, 4, 16, 64)}))
    plot_passk_bands({"SFT": sft, **{label: [eval_record(r) for r in arm_runs(arm)] for arm, label in arms.items()}},
                     "ph_passk_training")
    s1, s64 = [e["pass@1"] for e in sft], [e["pass@64"] for e in sft]
    check = SeedChecks()
    for arm in ("passk4", "passk16"):
        p1, p64 = per_seed(arm, final("pass@1")), per_seed(arm, final("pass@64"))
        g64 = per_seed("grpo", final("pass@64"))
        check(f"(k) {arms[arm]} keeps pass@64 at or above the SFT model's", [a >= b for a, b in zip(p64, s64)],
              f"{spread(p64)} vs SFT {spread(s64)}")
        check(f"(k) {arms[arm]} keeps pass@64 above GRPO's", [a > b for a, b in zip(p64, g64)],
              f"{spread(p64)} vs GRPO {spread(g64)}")
        check(f"(k) {arms[arm]} still raises pass@1 above the SFT model's", [a > b for a, b in zip(p1, s1)],
              f"{spread(p1)} vs SFT {spread(s1)}")
    save("ph_passk_training", {"arms": {a: {c: per_seed(a, fn) for c, fn in columns.items()} for a in arms},
                               "sft": sft, "checks": check.results})
    return check.ok


PHENOMENA.update({"dont": dont, "generalise": generalise, "passk_training": passk_training})


# ---- learned rewards and preferences, on add_noisy from the `compare` SFT model ---------------------------------

# Each arm: (script, flags, expected seconds per run on one core); every run starts from SFT (runs/cmp_sft) on
# add_noisy, where a reward model and DPO train in minutes, and samples the same 25,600 completions: GRPO 200 steps
# of 16 x 8; online DPO 100 steps of 64 prompts x 4; offline DPO's pair set 6,400 prompts x 4.
# (l) The reward model is trained on a limited, noisy set of pairs (128 prompts' pairs, 20% of the labels swapped),
# the regime where Gao et al. 2023 see over-optimisation. beta ~ 0 is 1e-6, not 0, so that the reference is loaded
# and the KL logged; its pull is nil.
BT_RM = ("runs/ph_rm_bt", py("reward_model.py", "--policy", SFT, "--run-name", "ph_rm_bt", "--num-pair-prompts",
                             "128", "--label-noise", "0.2", "--no-tensorboard"), 240)
BT_RM_MORE = ("runs/ph_rm_bt_more", py("reward_model.py", "--policy", SFT, "--run-name", "ph_rm_bt_more",
                                       "--no-tensorboard"), 480)  # the default: 1,024 prompts' pairs, clean labels
JUDGE_RM = ("runs/ph_rm_judge", py("reward_model.py", "--mode", "judge", "--policy", SFT, "--run-name", "ph_rm_judge",
                                   "--num-pair-prompts", "128", "--no-tensorboard"), 300)
LEARNED = {
    "rm_beta0": ("grpo.py", ["--reward-model", BT_RM[0], "--beta", "1e-6"], 200),
    "rm_beta": ("grpo.py", ["--reward-model", BT_RM[0], "--beta", "0.1"], 200),
    "rm_more_beta0": ("grpo.py", ["--reward-model", BT_RM_MORE[0], "--beta", "1e-6"], 200),
    "judge_beta0": ("grpo.py", ["--reward-model", JUDGE_RM[0], "--beta", "1e-6"], 260),
    "pf_grpo": ("grpo.py", [], 150),
    "pf_dpo": ("dpo.py", ["--num-pair-prompts", "6400"], 200),
    "pf_odpo": ("dpo.py", ["--online", "--total-steps", "100"], 200),
}


def learned_plan(*arms: str, seeds=SEEDS) -> list[tuple]:
    plan = [(*SFT_RUN, [])] if not finished(SFT) else []
    for arm in arms:
        script, flags, seconds = LEARNED[arm]
        needs = [rm[0] for rm in (BT_RM, BT_RM_MORE, JUDGE_RM) if rm[0] in flags]
        plan += [(rm[0], rm[1], rm[2], [SFT]) for rm in (BT_RM, BT_RM_MORE, JUDGE_RM) if rm[0] in flags]
        for seed in seeds:
            run = f"ph_{arm}_s{seed}"
            plan.append((f"runs/{run}", py(script, "--model", SFT, "--task", "add_noisy", "--run-name", run, "--seed",
                                          str(seed), *([] if "--total-steps" in flags else ["--total-steps", "200"]),
                                          *EVAL, "--eval-every", "0", *flags), seconds, [SFT, *needs]))
    return plan


SFT_RUN = sft_plan()


def heldout_kl(run: str, num_prompts: int = 100, samples: int = 8) -> float:
    """KL(pi || pi_SFT) per completion on held-out prompts, mean of sum_t (log pi - log pi_SFT) over the policy's own
    samples at T = 1 (the unbiased k1 estimate): one KL every arm, DPO's included, is measured by. Cached in the run."""
    import torch

    from common.logprobs import rollout_logprobs
    from common.models import load_model_and_tokenizer
    from common.rollout import generate_hf
    from common.tasks import format_prompt, load_task

    path = os.path.join(REPO, run, "heldout_kl.json")
    if not os.path.exists(path):
        task = load_task("add_noisy")
        model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"), torch.float32)
        ref = load_model_and_tokenizer(os.path.join(REPO, SFT), torch.device("cpu"), torch.float32)[0].eval()
        prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in task.test["question"][:num_prompts]]
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            rollout = generate_hf(model.eval(), tokenizer, prompts, samples, 1.0, task.max_new_tokens, 1.0,
                                  [tokenizer.eos_token_id])
            mask = rollout.completion_mask.float()  # (B, C)
            kl = ((rollout_logprobs(model, rollout)[0] - rollout_logprobs(ref, rollout)[0]) * mask).sum(-1).mean()
        with open(path, "w") as f:
            json.dump({"kl": kl.item(), "prompts": num_prompts, "samples": samples}, f)
    with open(path) as f:
        return json.load(f)["kl"]


def overopt(fresh: bool) -> bool:
    """(l) Gao et al. 2023, reward-model over-optimisation: GRPO on a Bradley-Terry reward model trained on few, noisy
    pairs, beta ~ 0 and beta 0.1, and on one trained on 8x the pairs with clean labels: the proxy reward keeps rising;
    does the gold (verifier) accuracy peak and fall, and at what KL? One run (seed 1) against the judge as well."""
    run_all(learned_plan("rm_beta0", "rm_beta") + learned_plan("judge_beta0", seeds=(1,))
            + learned_plan("rm_more_beta0"), fresh, jobs=2)
    for rm in (BT_RM, BT_RM_MORE, JUDGE_RM):
        e = eval_record(rm[0])
        print(f"reward model `{rm[0]}`: held-out pair accuracy {e.get('pair_accuracy', float('nan')):.3f}, "
              f"agreement (AUC) with the verifier {e.get('agreement', float('nan')):.3f}")
    arms = {"rm_beta0": "GRPO on the BT reward model, beta ~ 0", "rm_beta": "GRPO on the BT reward model, beta 0.1",
            "rm_more_beta0": "GRPO on the BT reward model of 8x the clean pairs, beta ~ 0"}
    check, data = SeedChecks(), {"reward_model": eval_record(BT_RM[0]), "reward_model_more": eval_record(BT_RM_MORE[0]),
                                 "judge": eval_record(JUDGE_RM[0]), "arms": {}}

    def trace(run):  # per step, trailing mean of 10: proxy reward, gold accuracy, KL to the reference
        from common.plot import series

        return {k: series(steps(run), key, smooth=10)[1] for k, key in
                (("proxy", "reward/proxy"), ("gold", "sampled_accuracy"), ("kl", "kl"))}

    print("\n| arm | proxy first 10 -> last 10 | gold: first 10, peak (step), last 10 | KL at the gold peak -> last |"
          "\n|---|---:|---:|---:|")
    for arm, label in {**arms, "judge_beta0": "GRPO on the judge, beta ~ 0 (seed 1)"}.items():
        runs = [f"runs/ph_{arm}_s{seed}" for seed in (SEEDS if arm in arms else (1,))]
        per = []
        for run in runs:
            t = trace(run)
            peak = max(range(len(t["gold"])), key=t["gold"].__getitem__)
            per.append({"proxy_first": t["proxy"][9], "proxy_last": t["proxy"][-1], "gold_first": t["gold"][9],
                        "gold_peak": t["gold"][peak], "peak_step": peak + 1, "gold_last": t["gold"][-1],
                        "kl_at_peak": t["kl"][peak], "kl_last": t["kl"][-1], "pass@1": eval_record(run)["pass@1"]})
        data["arms"][arm] = per
        col = lambda k, per=per: spread([p[k] for p in per])  # noqa: E731
        print(f"| {label} | {col('proxy_first')} -> {col('proxy_last')} | {col('gold_first')}, {col('gold_peak')} "
              f"(step {', '.join(str(p['peak_step']) for p in per)}), {col('gold_last')} | {col('kl_at_peak')} -> "
              f"{col('kl_last')} |")
        if arm in arms:
            check(f"(l) {label}: the proxy reward rises", [p["proxy_last"] > p["proxy_first"] for p in per],
                  f"{col('proxy_first')} -> {col('proxy_last')}")
            check(f"(l) {label}: gold accuracy peaks and then falls (last 10 steps >= 0.03 below the peak)",
                  [p["gold_peak"] - p["gold_last"] >= 0.03 for p in per], f"peak {col('gold_peak')}, last "
                  f"{col('gold_last')}")
    plot_bands({label: [f"runs/ph_{arm}_s{s}" for s in SEEDS] for arm, label in arms.items()},
               [("reward/proxy", "proxy reward (the reward model's score)"),
                ("sampled_accuracy", "gold accuracy (the verifier, sampled)"), ("kl", "KL to the reference (log)")],
               "ph_overopt", log_keys=("kl",))
    data["checks"] = check.results
    save("ph_overopt", data)
    return check.ok


def prefs(fresh: bool) -> bool:
    """(m) Preferences vs rewards: offline DPO on pairs from the SFT model, online DPO, GRPO, from the same SFT model
    at the same number of samples: pass@1, pass@8 and KL to the SFT model. Does online beat offline here?"""
    arms = {"pf_dpo": "offline DPO", "pf_odpo": "online DPO", "pf_grpo": "GRPO"}
    run_all(learned_plan(*arms), fresh, jobs=2)
    columns = {"pass@1": final("pass@1"), "pass@8": final("pass@8"), "greedy": final("accuracy"),
               "KL to SFT (held-out, per completion)": heldout_kl,
               "train seconds": lambda r: sum(x.get("step_time") or 0 for x in steps(r))}
    sft = eval_record(SFT)
    print(f"\nSFT (`{SFT}`): pass@1 {sft['pass@1']:.3f}, pass@8 {sft['pass@8']:.3f}\n" + arm_table(arms, columns))
    p1 = {a: per_seed(a, final("pass@1")) for a in arms}
    check = SeedChecks()
    for arm in arms:
        check(f"(m) {arms[arm]} raises pass@1 above the SFT model's", [v > sft["pass@1"] for v in p1[arm]],
              f"{spread(p1[arm])} vs {sft['pass@1']:.3f}")
    check("(m) online DPO beats offline DPO at pass@1", [a > b for a, b in zip(p1["pf_odpo"], p1["pf_dpo"])],
          f"{spread(p1['pf_odpo'])} vs {spread(p1['pf_dpo'])}")
    check("(m) GRPO beats offline DPO at pass@1", [a > b for a, b in zip(p1["pf_grpo"], p1["pf_dpo"])],
          f"{spread(p1['pf_grpo'])} vs {spread(p1['pf_dpo'])}")
    plot_passk_bands({"SFT": [sft] * len(SEEDS), **{label: [eval_record(r) for r in arm_runs(arm)]
                                                     for arm, label in arms.items()}}, "ph_prefs", "add_noisy", 200)
    save("ph_prefs", {"sft": sft, "arms": {a: {c: per_seed(a, fn) for c, fn in columns.items()} for a in arms},
                      "checks": check.results})
    return check.ok


PHENOMENA.update({"overopt": overopt, "prefs": prefs})


# ---- (n) tool use: does RL learn to call the tool where it helps, and not where it does not? ------------------------

# One SFT model on tool_calc (its teacher calls the tool in 30% of the demonstrations and otherwise guesses the product,
# or adds by itself on `add`), then GRPO from it for each seed, with calls free and with a price of 0.1 a call: every
# run samples multi-turn rollouts (common/environment.py). Evaluation: 200 held-out prompts (half `mul`, half `add`)
# x 8 samples at T = 1; `tool_call_rate` is the share of those samples that call the tool.
TOOL_EVAL = ["--num-eval-prompts", "200", "--num-eval-samples", "8", "--eval-every", "0", "--no-tensorboard"]
TOOL_SFT = ("runs/tool_sft", py("sft.py", "--task", "tool_calc", "--run-name", "tool_sft", "--total-steps", "800",
                                "--seed", "1", *TOOL_EVAL), 300)
TOOL_GRPO_STEPS = 40
# The third arm asks whether the cost arm's lost `add` accuracy comes from the group std: a group of `add` samples
# that are all right differs only by the 0.1 of a call, and dividing by that small std turns it into advantages as
# large as a right-vs-wrong difference, on every token of the completion (Dr. GRPO's argument against the std).
TOOL_ARMS = {"tool_grpo": ("GRPO, calls free", []),
             "tool_grpo_cost": ("GRPO, 0.1 a call", ["--tool-call-cost", "0.1"]),
             "tool_grpo_cost_nostd": ("GRPO, 0.1 a call, no std scaling", ["--tool-call-cost", "0.1",
                                                                          "--scale-rewards", "none"])}


def tools(fresh: bool) -> bool:
    """(n) SFT vs GRPO on the tool task: call rate and accuracy per slice. On `mul` a call is right and a guess is
    wrong, so GRPO should call there nearly always; on `add` a call buys nothing: free, nothing pushes the rate either
    way (but what is learnt on `mul` may spill over); at 0.1 a call, GRPO should stop calling there."""
    grpo = lambda arm, seed, flags: py("grpo.py", "--model", TOOL_SFT[0], "--task", "tool_calc", "--run-name",
                                       f"{arm}_s{seed}", "--seed", str(seed), "--total-steps", str(TOOL_GRPO_STEPS),
                                       *TOOL_EVAL, *flags)
    plan = [TOOL_SFT] + [(f"runs/{arm}_s{seed}", grpo(arm, seed, flags), 90, [TOOL_SFT[0]])
                         for arm, (_, flags) in TOOL_ARMS.items() for seed in SEEDS]
    run_all(plan, fresh, jobs=2)
    sft = eval_record(TOOL_SFT[0])
    runs = {arm: [f"runs/{arm}_s{seed}" for seed in SEEDS] for arm in TOOL_ARMS}
    keys = [("tool_call_rate/mul", "call rate, mul"), ("pass@1/mul", "pass@1, mul"),
            ("tool_call_rate/add", "call rate, add"), ("pass@1/add", "pass@1, add"),
            ("pass@1_with_call/add", "pass@1 with a call, add"), ("pass@1_without_call/add", "... without, add")]
    ev = {arm: {k: [eval_record(r)[k] for r in rs] for k, _ in keys} for arm, rs in runs.items()}
    print("\n| model | " + " | ".join(label for _, label in keys) + " |\n|---|" + "---:|" * len(keys))
    print(f"| SFT (`{TOOL_SFT[0]}`, one model) | " + " | ".join(f"{sft[k]:.3f}" for k, _ in keys) + " |")
    for arm, (label, _) in TOOL_ARMS.items():
        print(f"| {label}, {TOOL_GRPO_STEPS} steps (`runs/{arm}_s*`) | " +
              " | ".join(spread(ev[arm][k]) for k, _ in keys) + " |")
    check, free = SeedChecks(), ev["tool_grpo"]
    for arm, (label, _) in TOOL_ARMS.items():
        check(f"(n) {label}: calls the tool on `mul` more than SFT (by >= 0.3)",
              [v >= sft["tool_call_rate/mul"] + 0.3 for v in ev[arm]["tool_call_rate/mul"]],
              f"{spread(ev[arm]['tool_call_rate/mul'])} vs SFT {sft['tool_call_rate/mul']:.3f}")
        check(f"(n) {label}: pass@1 on `mul` above SFT's", [v > sft["pass@1/mul"] for v in ev[arm]["pass@1/mul"]],
              f"{spread(ev[arm]['pass@1/mul'])} vs SFT {sft['pass@1/mul']:.3f}")
    check("(n) GRPO, calls free: the call rate on `add` (no gain there) stays within 0.1 of SFT's",
          [abs(v - sft["tool_call_rate/add"]) <= 0.1 for v in free["tool_call_rate/add"]],
          f"{spread(free['tool_call_rate/add'])} vs SFT {sft['tool_call_rate/add']:.3f}")
    for arm in ("tool_grpo_cost", "tool_grpo_cost_nostd"):
        label, cost = TOOL_ARMS[arm][0], ev[arm]
        check(f"(n) {label}: calls on `add` less than SFT (by >= 0.1) and on `mul` more (by >= 0.3)",
              [a <= sft["tool_call_rate/add"] - 0.1 and m >= sft["tool_call_rate/mul"] + 0.3
               for a, m in zip(cost["tool_call_rate/add"], cost["tool_call_rate/mul"])],
              f"add {spread(cost['tool_call_rate/add'])}, mul {spread(cost['tool_call_rate/mul'])}")
        check(f"(n) {label}: pass@1 on `add` no lower than SFT's - 0.02",
              [v >= sft["pass@1/add"] - 0.02 for v in cost["pass@1/add"]],
              f"{spread(cost['pass@1/add'])} vs SFT {sft['pass@1/add']:.3f}")
    plot_bands({label: runs[arm] for arm, (label, _) in TOOL_ARMS.items()},
               [("tool/call_rate", "share of samples that call the tool (both slices)"),
                ("sampled_accuracy", "sampled accuracy"),
                ("tool/accuracy_without_call", "sampled accuracy of samples without a call")], "ph_tools", smooth=5)
    save("ph_tools", {"sft": sft, **{arm: {r: eval_record(r) for r in rs} for arm, rs in runs.items()},
                      "checks": check.results})
    return check.ok


PHENOMENA["tools"] = tools


PHENOMENON_ARMS = {"entropy": ["grpo", "clip_cov", "nsr", "ent_bonus", "temp", "grpo_mb4", "kl_cov_mb4"],
                   "passk": ["grpo"],
                   "forking": ["grpo", "top20", "bottom80"], "signs": ["grpo", "psr", "nsr", "w_reinforce"],
                   "distill": ["grpo", "distill"], "wrongref": ["grpo", "wrongref20"], "entropy_sign": ["grpo"],
                   "dont": ["nomul_sft1x", "nomul_sft2x", "nomul_sft4x", "nomul_grpo", "nomul_nsr"],
                   "generalise": ["grpo", "sft_longer"], "passk_training": ["grpo", "passk4", "passk16"],
                   "overopt": [], "prefs": [],  # these two run their own plan on add_noisy (learned_plan)
                   "tools": []}  # its own plan on tool_calc


def phenomena(only: str | None, fresh: bool) -> bool:
    """Every phenomenon on countdown_steps over SEEDS: one plan (the SFT model first, then every run, two at a
    time), then each phenomenon's table, figure and verdicts from the finished runs."""
    from benchmarks.reasoning_task import SFT_FLAGS

    names = [only] if only else list(PHENOMENA)
    arms = list(dict.fromkeys(a for n in names for a in PHENOMENON_ARMS[n]))
    plan = [(CDS_SFT, py("sft.py", *SFT_FLAGS), 560)] if arms else []  # overopt, prefs, tools: their own SFT
    plan += [(*TEACHER, [CDS_SFT])] if "distill" in arms else []
    plan += [(run, cmd, sec, [CDS_SFT, *needs]) for run, cmd, sec, needs in arm_plan(*arms)]
    run_all(plan, fresh, jobs=2)
    ok = True
    for name in names:
        print(f"\n##### {name}")
        ok = PHENOMENA[name](False) and ok
    return ok


EXPERIMENTS = {"compare": compare}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?", choices=[*EXPERIMENTS, "phenomena", "figures"],
                        help="phenomena is the default with --only")
    parser.add_argument("--only", choices=list(PHENOMENA), help="phenomena: just this one")
    parser.add_argument("--fresh", action="store_true", help="re-run finished runs too")
    args = parser.parse_args()
    if args.experiment is None and args.only:  # `experiments.py --only tools` = `experiments.py phenomena --only tools`
        args.experiment = "phenomena"
    if args.experiment is None:
        parser.error("name an experiment (compare, phenomena, figures) or --only a phenomenon")
    if args.experiment == "figures":  # redraw from the saved numbers; checks nothing
        figures()
        return
    if args.only and args.experiment != "phenomena":
        parser.error("--only picks one of the phenomena: `experiments.py phenomena --only entropy`")
    start = time.perf_counter()
    if args.experiment == "phenomena":
        ok = phenomena(args.only, args.fresh)
    else:
        print(f"\n##### {args.experiment}")
        ok = EXPERIMENTS[args.experiment](args.fresh)
    print(f"\n{_mmss(time.perf_counter() - start)} wall")
    print("\nevery direction holds" if ok else "\nsome direction does not hold (see above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
