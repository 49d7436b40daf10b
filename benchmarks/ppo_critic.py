"""What ppo.py's critic buys, and the known fixes for one that buys nothing: every arm over 3 seeds.

    python benchmarks/ppo_critic.py            # everything (~3 h on 2 cores; finished runs are reused)
    python benchmarks/ppo_critic.py --only hard     # the harder setting: diagnosis + fixes (~2 h)
    python benchmarks/ppo_critic.py --only default  # the default task (add_noisy) (~40 min)
    python benchmarks/ppo_critic.py --only reasoning   # explained variance on countdown_steps (~20 min)
    python benchmarks/ppo_critic.py --report   # the tables and figures from the finished runs, no training

Settings (nothing tuned; the seeds are the project's 1, 2, 3):
- hard: add_carry_noisy (the teacher drops the carry 80% of the time on carry problems) from an SFT model trained
  on that task with seed 4 (runs/c22_sft), where the issue measured PPO far behind its siblings.
- default: add_noisy from runs/cmp_sft (the `compare` experiment's SFT model).
- reasoning: countdown_steps from runs/sft_countdown_steps (benchmarks/reasoning_task.py), where intermediate steps
  carry partial progress a critic could read.
Every RL run samples the same number of completions: 200 batches of 16 prompts x 8. PPO's value warm-up batches
count: 20 warm-up batches + 180 PPO steps. Evaluation: 200 held-out prompts x 16 samples at T = 1 (pass@1,
unbiased), the same prompts for every run; the SFT model is evaluated the same way (seed 1).
Diagnosis arms (100 steps, read against PPO's defaults at steps 91-100) change one flag of PPO's defaults each
(the issue's suspects): 1 epoch instead of 4, no KL (beta 0), no advantage whitening, no critic (its learning rate
~0, so V stays the zero head: A = the lambda-discounted return, whitened: REINFORCE with the batch-mean baseline),
decoupled GAE alone (lambda 1 for the critic). Fixes at 200 batches: VC-PPO (value warm-up + decoupled GAE), VAPO
(the same + length-adaptive lambda, alpha 0.05 as the paper), and 1 epoch, where the diagnosis pointed.
Runs start in order of what the docs need first (the diagnosis, the baselines, the reasoning task, VC-PPO); the
whitening, decoupled-alone and VAPO arms come last. Measured on the shared 2 cores: a 200-step PPO run ~10 min
(4 epochs), ~4 min (1 epoch); REINFORCE / GRPO ~2 min.
Prints per setting a table (mean [min, max] over seeds) and the issue's target (PPO's gain >= REINFORCE's - 3
points) per arm and seed; writes docs/figures/ppo_critic_<setting>.png and .json.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.experiments import (FIGURES, REPO, SeedChecks, eval_record, finished, mean_of,  # noqa: E402
                                    plot_bands, py, run_all, save, spread, steps)

SEEDS = (1, 2, 3)
STEPS = 200
WARMUP = 20
EVAL = ["--num-eval-prompts", "200", "--num-eval-samples", "16", "--eval-every", "0", "--no-tensorboard"]
SETTINGS = {  # name: (task, SFT run, the command that trains it, its expected seconds)
    "hard": ("add_carry_noisy", "runs/c22_sft",
             py("sft.py", "--task", "add_carry_noisy", "--seed", "4", "--run-name", "c22_sft", "--no-tensorboard"),
             420),
    "default": ("add_noisy", "runs/cmp_sft", py("sft.py", "--run-name", "cmp_sft", "--num-eval-samples", "64",
                                                 "--no-tensorboard"), 300),
}
VC_PPO = ["--value-warmup-steps", str(WARMUP), "--lam-critic", "1", "--total-steps", str(STEPS - WARMUP)]
SHORT = ["--total-steps", "100"]  # the diagnosis arms: PPO's old default length, read against PPO's steps 91-100
ARMS = {  # name: (label, script, flags, expected seconds on one core)
    "reinforce": ("REINFORCE", "reinforce.py", [], 90),
    "grpo": ("GRPO", "grpo.py", [], 100),
    "ppo": ("PPO (defaults)", "ppo.py", [], 330),
    "ppo_vcppo": ("PPO, VC-PPO (warm-up + decoupled)", "ppo.py", VC_PPO, 330),
    "ppo_vapo": ("PPO, VAPO (VC-PPO + length-adaptive lambda)", "ppo.py", [*VC_PPO, "--lam-actor-alpha", "0.05"], 330),
    "ppo_1epoch": ("PPO, 1 epoch", "ppo.py", ["--num-epochs", "1"], 140),
    "ppo_epochs1": ("PPO, 1 epoch (100 steps)", "ppo.py", [*SHORT, "--num-epochs", "1"], 70),
    "ppo_nocritic": ("PPO, no critic: V = 0 (100 steps)", "ppo.py", [*SHORT, "--vf-learning-rate", "1e-30"], 165),
    "ppo_beta0": ("PPO, no KL: beta 0 (100 steps)", "ppo.py", [*SHORT, "--beta", "0"], 150),
    "ppo_nowhiten": ("PPO, no advantage whitening (100 steps)", "ppo.py", [*SHORT, "--no-whiten-advantages"], 165),
    "ppo_decoupled": ("PPO, decoupled GAE: lambda_critic 1 (100 steps)", "ppo.py", [*SHORT, "--lam-critic", "1"], 165),
}
SETTING_ARMS = {"hard": list(ARMS), "default": ["reinforce", "ppo", "ppo_vcppo", "ppo_1epoch"]}
# the order runs start in: the one-flag diagnosis, the baselines, the critic on the reasoning task, VC-PPO, the rest
ORDER = ["reinforce", "grpo", "ppo", "ppo_vcppo"]
DIAGNOSIS = ["ppo_epochs1", "ppo_nocritic", "ppo_beta0", "ppo_1epoch"]  # the last: what the diagnosis pointed at
REST = ["ppo_vapo", "ppo_nowhiten", "ppo_decoupled"]


def run_name(setting: str, arm: str, seed: int) -> str:
    return f"runs/c22_{setting}_{arm}_s{seed}"


def plan(setting: str, arms: list[str]) -> list[tuple]:
    task, sft, sft_cmd, sft_seconds = SETTINGS[setting]
    out = [(sft, sft_cmd, sft_seconds)]
    for arm in arms:
        _, script, flags, seconds = ARMS[arm]
        total = [] if "--total-steps" in flags else ["--total-steps", str(STEPS)]
        for seed in SEEDS:
            run = run_name(setting, arm, seed)
            out.append((run, py(script, "--model", sft, "--task", task, "--run-name", run[len("runs/"):], "--seed",
                                str(seed), *total, *EVAL, *flags), seconds, [sft]))
    return out


def sft_eval(setting: str) -> dict:
    """The SFT model's eval record with the RL runs' settings (200 prompts x 16, seed 1), cached in its folder."""
    import json

    import torch

    from common.evaluation import evaluate
    from common.models import load_model_and_tokenizer
    from common.tasks import load_task

    task, sft = SETTINGS[setting][:2]
    path = os.path.join(REPO, sft, "eval_200x16_seed1.json")
    if not os.path.exists(path):
        model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, sft), torch.device("cpu"), torch.float32)
        with open(path, "w") as f:
            json.dump(evaluate(model.eval(), tokenizer, load_task(task), 200, 16, seed=1), f)
    with open(path) as f:
        return json.load(f)


def report(setting: str) -> bool:
    """The table, the figure and the target check of one setting, from its finished runs."""
    arms = [a for a in SETTING_ARMS[setting] if all(finished(run_name(setting, a, seed)) for seed in SEEDS)]
    print(f"not run (yet): {', '.join(a for a in SETTING_ARMS[setting] if a not in arms) or 'none'}")
    before = sft_eval(setting)["pass@1"]
    runs = {arm: [run_name(setting, arm, s) for s in SEEDS] for arm in arms}
    gain = {arm: [eval_record(r)["pass@1"] - before for r in rs] for arm, rs in runs.items()}

    def sampled(rs, lo, hi):  # mean sampled accuracy of steps lo..hi (1-based), per seed
        return [mean_of([r for r in steps(x) if lo <= r["step"] <= hi], "sampled_accuracy") for x in rs]

    print(f"\n#### {setting}: {SETTINGS[setting][0]} from {SETTINGS[setting][1]} (pass@1 {before:.3f})\n")
    columns = ["pass@1 gain", "pass@1", "sampled acc. steps 91-100", "last 10 steps", "EV (steps 1-10 -> last 20)",
               "KL last 20"]
    print("| arm | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    data = {"sft_pass@1": before, "arms": {}}
    for arm, rs in runs.items():
        last = len(steps(rs[0]))
        ev = ([mean_of(steps(r)[:10], "explained_variance") for r in rs],
              [mean_of(steps(r)[-20:], "explained_variance") for r in rs]) if arm.startswith("ppo") else None
        kl = [mean_of(steps(r)[-20:], "kl") for r in rs]
        row = {"gain": gain[arm], "pass@1": [eval_record(r)["pass@1"] for r in rs],
               "sampled_91_100": sampled(rs, 91, 100), "sampled_last10": sampled(rs, last - 9, last), "kl": kl,
               "ev_first10": ev[0] if ev else None, "ev_last20": ev[1] if ev else None}
        data["arms"][arm] = row
        cells = [spread(row["gain"]), spread(row["pass@1"]), spread(row["sampled_91_100"]),
                 spread(row["sampled_last10"]), f"{spread(ev[0])} -> {spread(ev[1])}" if ev else "-",
                 spread(kl) if all(k == k for k in kl) else "-"]
        print(f"| {ARMS[arm][0]} | " + " | ".join(cells) + " |")
    check = SeedChecks()
    for arm in arms:
        if "--total-steps" in ARMS[arm][2] and "100" in ARMS[arm][2]:  # a diagnosis arm: against PPO at step 100
            ours, base = data["arms"][arm]["sampled_91_100"], data["arms"]["ppo"]["sampled_91_100"]
            check(f"{setting}: {ARMS[arm][0]} samples better than PPO's defaults at steps 91-100",
                  [a > b for a, b in zip(ours, base)], f"{spread(ours)} vs {spread(base)}")
        elif arm.startswith("ppo"):
            check(f"{setting}: {ARMS[arm][0]} gains >= REINFORCE's - 0.03",
                  [g >= r - 0.03 for g, r in zip(gain[arm], gain["reinforce"])],
                  f"{spread(gain[arm])} vs REINFORCE {spread(gain['reinforce'])}")
    data["checks"] = check.results
    save(f"ppo_critic_{setting}", data)
    shown = [a for a in ("reinforce", "grpo", "ppo", "ppo_vcppo", "ppo_1epoch", "ppo_vapo") if a in arms]
    plot_bands({ARMS[a][0]: runs[a] for a in shown}, [("sampled_accuracy", "sampled accuracy (pass@1 of the batch)"),
                                                      ("explained_variance", "explained variance (PPO's critic)")],
               f"ppo_critic_{setting}")
    return check.ok


def reasoning_plan() -> list[tuple]:
    """PPO on countdown_steps: 10 steps after 20 warm-up batches (VC-PPO) or none, to read the critic's EV."""
    out = []
    for arm, flags in (("ppo_vcppo", ["--value-warmup-steps", str(WARMUP), "--lam-critic", "1"]), ("ppo", [])):
        for seed in SEEDS:
            run = run_name("reasoning", arm, seed)
            out.append((run, py("ppo.py", "--model", "runs/sft_countdown_steps", "--task", "countdown_steps",
                                "--run-name", run[len("runs/"):], "--seed", str(seed), "--total-steps", "10",
                                "--num-eval-prompts", "100", "--num-eval-samples", "4", "--eval-every", "0",
                                "--no-tensorboard", *flags), 400))
    return out


def reasoning_report() -> dict:
    def warmup(run):
        from common.tracking import read_metrics

        return [r for r in read_metrics(os.path.join(REPO, run)) if r.get("event") == "value_warmup"]

    data = {}
    print("\n#### reasoning: countdown_steps from runs/sft_countdown_steps, PPO 10 steps\n")
    print("| arm | EV, last 5 warm-up batches | EV, PPO steps 1-5 | EV, PPO steps 6-10 |\n|---|---:|---:|---:|")
    for arm in ("ppo", "ppo_vcppo"):
        rs = [run_name("reasoning", arm, s) for s in SEEDS]
        if not all(finished(r) for r in rs):
            print(f"| {arm} | not run (yet) | | |")
            continue
        w = [mean_of(warmup(r)[-5:], "explained_variance") for r in rs] if arm == "ppo_vcppo" else None
        first, last = ([mean_of(steps(r)[:5], "explained_variance") for r in rs],
                       [mean_of(steps(r)[-5:], "explained_variance") for r in rs])
        data[arm] = {"ev_warmup_last5": w, "ev_steps_1_5": first, "ev_steps_6_10": last}
        print(f"| {arm} | {spread(w) if w else '-'} | {spread(first)} | {spread(last)} |")
    save("ppo_critic_reasoning", data)
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["hard", "default", "reasoning"])
    parser.add_argument("--report", action="store_true", help="only print the tables from finished runs")
    args = parser.parse_args()
    settings = [args.only] if args.only else ["hard", "default", "reasoning"]
    if not args.report:
        trained = [s for s in settings if s != "reasoning"]
        reasoning = reasoning_plan() if "reasoning" in settings else []

        def stage(arms):
            return [p for s in trained for p in plan(s, [a for a in arms if a in SETTING_ARMS[s]])]
        run_all(stage(DIAGNOSIS) + stage(ORDER[:3]) + reasoning[:len(SEEDS)] + stage(ORDER) + reasoning[len(SEEDS):]
                + stage(REST), False, jobs=2)
    ok = True
    for setting in settings:
        if setting == "reasoning":
            reasoning_report()
        else:
            ok = report(setting) and ok
    print(f"\nfigures and numbers in {os.path.relpath(FIGURES, REPO)}/ppo_critic_*")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
