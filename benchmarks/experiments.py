"""The side-by-side comparison and the phenomena of the Chinese survey "rl与sft", each one command on a CPU.

    python benchmarks/experiments.py compare     # SFT, then every RL script from it, same budget (~15 min)
    python benchmarks/experiments.py entropy     # (b) GRPO's entropy falls; Clip-Cov, KL-Cov, NSR keep it up
    python benchmarks/experiments.py passk       # (c) pass@k on countdown: RL wins at k = 1, SFT catches up
    python benchmarks/experiments.py forking     # (d) train on the top 20% entropy tokens / all / bottom 80%
    python benchmarks/experiments.py noisy_refs  # (e) 5% / 20% wrong reference answers; flag them
    python benchmarks/experiments.py all
    python benchmarks/experiments.py figures     # redraw docs/figures/curve_<script>.png from compare.json, no training

`compare` also holds phenomenon (a): RL goes past the noisy teacher; 200 more SFT steps do not.
Every experiment prints its runs as they go (which run, its progress bar, elapsed and an
estimate of the time left), then a table, then one line per *direction* it checks: `holds` or
`DOES NOT HOLD`, with the numbers. It exits 1 if a direction does not hold, so this file is the
check for each phenomenon; exact numbers are not pinned. Figures go to docs/figures/, numbers to
docs/figures/<experiment>.json. A finished run (its metrics.jsonl has an eval record) is
reused, so an interrupted experiment continues where it stopped (--fresh re-runs everything).
All runs evaluate pass@k with 64 samples per prompt (k = 1, 2, 4, ..., 64, unbiased).
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


def run_all(plan: list[tuple[str, list[str], float]], fresh: bool):
    """plan: (run folder, command, expected seconds). Runs them in order with a header per run."""
    start, expected_done, actual_done = time.perf_counter(), 0.0, 0.0
    todo = [p for p in plan if fresh or not finished(p[0])]
    for run, _, _ in plan:
        if not any(run == t[0] for t in todo):
            print(f"reusing {run} (finished; --fresh re-runs it)")
    for i, (run, cmd, expected) in enumerate(todo):
        pace = actual_done / expected_done if expected_done else 1.0  # this machine vs the estimates
        left = pace * sum(e for _, _, e in todo[i:])
        elapsed = _mmss(time.perf_counter() - start)
        print(f"\n=== [{i + 1}/{len(todo)}] {run}: {' '.join(cmd[1:])}\n    elapsed {elapsed}, about {_mmss(left)} "
              "left",
              flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        actual_done, expected_done = actual_done + time.perf_counter() - t0, expected_done + expected
    print(f"\nall runs done in {_mmss(time.perf_counter() - start)}")


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


def entropy(fresh: bool) -> bool:
    """(b) Cui et al. 2025: entropy falls under GRPO; Clip-Cov / KL-Cov / NSR hold it up at similar reward."""
    rl = ["--model", SFT, "--total-steps", "200", *EVAL]
    plan = [sft_plan(),
            ("runs/cmp_grpo", py("grpo.py", "--run-name", "cmp_grpo", *rl), 50),
            ("runs/ent_clip_cov", py("grpo.py", "--run-name", "ent_clip_cov", "--cov-penalty", "clip_cov", *rl), 60),
            ("runs/ent_kl_cov", py("grpo.py", "--run-name", "ent_kl_cov", "--cov-penalty", "kl_cov", *rl), 60),
            ("runs/ent_nsr", py("reinforce.py", "--run-name", "ent_nsr", "--baseline", "none", "--sign-weighting",
                                "nsr", *rl), 50),
            # the papers' ratios pick 1 token of a ~470-token batch here; 100x as many, to see whether more acts
            ("runs/ent_clip_cov_x100", py("grpo.py", "--run-name", "ent_clip_cov_x100", "--cov-penalty", "clip_cov",
                                          "--clip-cov-frac", "0.02", *rl), 60),
            ("runs/ent_kl_cov_x100", py("grpo.py", "--run-name", "ent_kl_cov_x100", "--cov-penalty", "kl_cov",
                                        "--kl-cov-frac", "0.2", *rl), 60)]
    run_all(plan, fresh)
    runs = ["runs/cmp_grpo", "runs/ent_clip_cov", "runs/ent_kl_cov", "runs/ent_nsr", "runs/ent_clip_cov_x100",
            "runs/ent_kl_cov_x100"]
    labels = ["GRPO", "GRPO + Clip-Cov", "GRPO + KL-Cov", "NSR (reinforce.py)", "Clip-Cov, ratio 0.02 (100x)",
              "KL-Cov, ratio 0.2 (100x)"]
    plot(runs, labels, "entropy", passk=False)
    fits = {label: entropy_fit(steps(run)) for label, run in zip(labels, runs)}
    _plot_entropy_reward(runs, labels, fits)
    print("\n| run | entropy, first 20 steps | entropy, last 20 | sampled acc., last 20 | fit a | fit b | R^2 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary = {}
    for label, run in zip(labels, runs):
        s = steps(run)
        summary[label] = dict(h0=mean_of(s[:20], "entropy"), h1=mean_of(s[-20:], "entropy"),
                              acc=mean_of(s[-20:], "sampled_accuracy"), **fits[label])
        v = summary[label]
        print(f"| {label} | {v['h0']:.3f} | {v['h1']:.3f} | {v['acc']:.3f} | {v['a']:.3f} | {v['b']:.3f} | "
              f"{v['r2']:.2f} |")
    check = Checks()
    g = summary["GRPO"]
    check("(b) GRPO's entropy falls", g["h1"] < 0.8 * g["h0"], f"{g['h0']:.3f} -> {g['h1']:.3f}")
    for label in labels[1:]:
        v = summary[label]
        check(f"(b) {label} keeps entropy above GRPO's", v["h1"] > g["h1"], f"{v['h1']:.3f} vs {g['h1']:.3f}")
        check(f"(b) {label} at similar reward (within 0.1)", abs(v["acc"] - g["acc"]) < 0.1,
              f"sampled acc. {v['acc']:.3f} vs {g['acc']:.3f}")
    check("(b) R = -a exp(H) + b fits GRPO's run with a > 0", g["a"] > 0 and g["r2"] > 0.5,
          f"a {g['a']:.3f}, b {g['b']:.3f}, R^2 {g['r2']:.2f}")
    save("entropy", {"runs": summary, "checks": check.results})
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


def _plot_entropy_reward(runs, labels, fits):
    """docs/figures/entropy_fit.png: sampled accuracy against entropy per step, and each run's fit."""
    from common.plot import STYLE, _pyplot

    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for i, (run, label) in enumerate(zip(runs, labels)):
            s = [r for r in steps(run) if r.get("entropy") is not None]
            hs, rs = [r["entropy"] for r in s], [r["sampled_accuracy"] for r in s]
            ax.scatter(hs, rs, s=8, alpha=0.4, color=f"C{i}")
            grid = sorted(hs)
            f = fits[label]
            ax.plot(grid, [-f["a"] * math.exp(h) + f["b"] for h in grid], color=f"C{i}",
                    label=f"{label}: a={f['a']:.2f}, b={f['b']:.2f}")
        ax.set_xlabel("policy entropy H (nats per token)")
        ax.set_ylabel("sampled accuracy R (per step)")
        ax.set_title("R = -a exp(H) + b (Cui et al. 2025), one point per step")
        ax.legend(fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(FIGURES, "entropy_fit.png"))
        plt.close(fig)


def passk(fresh: bool) -> bool:
    """(c) Yue et al. 2025 on countdown (many answers, room at large k): RL wins pass@1, SFT catches up at k = 64."""
    plan = [("runs/pk_sft_countdown", py("sft.py", "--task", "countdown", "--run-name", "pk_sft_countdown", *EVAL),
             420),
            ("runs/pk_grpo_countdown", py("grpo.py", "--task", "countdown", "--model", "runs/pk_sft_countdown",
                                          "--run-name", "pk_grpo_countdown", "--total-steps", "200", *EVAL), 200)]
    run_all(plan, fresh)
    runs, labels = ["runs/pk_sft_countdown", "runs/pk_grpo_countdown"], ["SFT (countdown)", "GRPO from it"]
    plot(runs, labels, "passk_countdown", curves=False)
    print("\n" + table(list(zip(labels, runs)), keys=("accuracy", "pass@1", "pass@4", "pass@16", "pass@64")))
    sft, rl = eval_record(runs[0]), eval_record(runs[1])
    check = Checks()
    check("(c) RL wins at k = 1", rl["pass@1"] > sft["pass@1"], f"{rl['pass@1']:.3f} vs SFT {sft['pass@1']:.3f}")
    check("(c) SFT catches up or wins at k = 64", sft["pass@64"] >= rl["pass@64"] - 0.02,
          f"SFT {sft['pass@64']:.3f} vs RL {rl['pass@64']:.3f}")
    gap1, gap64 = rl["pass@1"] - sft["pass@1"], rl["pass@64"] - sft["pass@64"]
    check("(c) RL's lead shrinks as k grows", gap64 < gap1, f"lead {gap1:+.3f} at k=1, {gap64:+.3f} at k=64")
    save("passk_countdown", {"runs": {r: eval_record(r) for r in runs}, "checks": check.results})
    return check.ok


def forking(fresh: bool) -> bool:
    """(d) Wang et al. 2025: the gradient on the top 20% highest-entropy tokens vs all tokens vs the bottom 80%."""
    rl = ["--model", SFT, "--total-steps", "200", *EVAL]
    plan = [sft_plan(),
            ("runs/cmp_grpo", py("grpo.py", "--run-name", "cmp_grpo", *rl), 50),
            ("runs/fork_top20", py("grpo.py", "--run-name", "fork_top20", "--top-entropy-rho", "0.2", *rl), 60),
            ("runs/fork_bottom80", py("grpo.py", "--run-name", "fork_bottom80", "--top-entropy-rho", "0.2",
                                      "--entropy-tokens", "bottom", *rl), 60)]
    run_all(plan, fresh)
    runs, labels = ["runs/fork_top20", "runs/cmp_grpo", "runs/fork_bottom80"], ["top 20%", "all tokens", "bottom 80%"]
    plot(runs, labels, "forking", passk=False)
    print("\n" + table(list(zip(labels, runs)), keys=("accuracy", "pass@1", "pass@8")))
    top, every, bottom = (eval_record(r) for r in runs)
    check = Checks()
    check("(d) the top 20% alone learns about as well as all tokens", top["pass@1"] >= every["pass@1"] - 0.03,
          f"pass@1 {top['pass@1']:.3f} vs {every['pass@1']:.3f}")
    check("(d) the bottom 80% alone learns less", bottom["pass@1"] < every["pass@1"] - 0.03,
          f"pass@1 {bottom['pass@1']:.3f} vs {every['pass@1']:.3f}")
    save("forking", {"runs": {r: eval_record(r) for r in runs}, "checks": check.results})
    return check.ok


def noisy_refs(fresh: bool) -> bool:
    """(e) 5% and 20% of the RL prompts' reference answers wrong: what RL learns, what it costs, and the audit."""
    import torch

    from benchmarks.reference_audit import audit, summary
    from common.models import load_model_and_tokenizer
    from common.tasks import load_task

    rl = ["--model", SFT, "--total-steps", "200", *EVAL]
    plan = [sft_plan(),
            ("runs/cmp_grpo", py("grpo.py", "--run-name", "cmp_grpo", *rl), 50),
            ("runs/wrongref5", py("grpo.py", "--run-name", "wrongref5", "--task", "add_noisy_wrongref5", *rl), 50),
            ("runs/wrongref20", py("grpo.py", "--run-name", "wrongref20", "--task", "add_noisy_wrongref20", *rl), 50)]
    run_all(plan, fresh)
    runs = {"clean": "runs/cmp_grpo", "5% wrong": "runs/wrongref5", "20% wrong": "runs/wrongref20"}
    plot(list(runs.values()), list(runs), "noisy_refs", passk=False)
    task = load_task("add_noisy_wrongref20")
    results = {}
    print("\n| references | test pass@1 (clean) | greedy | zero-std groups, last 50 steps | on wrong-reference "
          "prompts: samples = the wrong reference | = the true answer | flagged (precision / recall) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, run in runs.items():
        model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, run), torch.device("cpu"), torch.float32)
        records = audit(model, tokenizer, task, num_prompts=600, samples=16, agree=0.5, rarely=0.25)
        wrong = [r for r in records if not r["reference_is_right"]]
        follows = sum(r["right_share"] for r in wrong) / len(wrong)  # share of samples equal to the wrong reference
        truth = sum(r["truth_share"] for r in wrong) / len(wrong)  # share of samples equal to the true answer
        s, e = summary(records), eval_record(run)
        results[label] = dict(test_pass1=e["pass@1"], greedy=e["accuracy"],
                              zero_std=mean_of(steps(run)[-50:], "frac_zero_std_groups"),
                              follows_wrong=follows, says_truth=truth, audit=s)
        v = results[label]
        print(f"| {label} | {v['test_pass1']:.3f} | {v['greedy']:.3f} | {v['zero_std']:.3f} | {follows:.3f} | "
              f"{truth:.3f} | {s['flagged']} of {len(wrong)} wrong ({s['precision']:.2f} / {s['recall']:.2f}) |")
    check = Checks()
    clean, w20 = results["clean"], results["20% wrong"]
    check("(e) wrong references cost clean test accuracy", w20["test_pass1"] < clean["test_pass1"],
          f"pass@1 {w20['test_pass1']:.3f} (20% wrong) vs {clean['test_pass1']:.3f} (clean)")
    check("(e) RL trained on them samples the wrong reference on those prompts more than the clean run does",
          w20["follows_wrong"] > clean["follows_wrong"], f"{w20['follows_wrong']:.3f} vs {clean['follows_wrong']:.3f}")
    check("(e) the audit finds wrong references (precision > 0.5, recall > 0.3) on the clean run's model",
          (clean["audit"]["precision"] or 0) > 0.5 and (clean["audit"]["recall"] or 0) > 0.3,
          f"precision {clean['audit']['precision']}, recall {clean['audit']['recall']}")
    save("noisy_refs", {"runs": results, "checks": check.results})
    return check.ok


EXPERIMENTS = {"compare": compare, "entropy": entropy, "passk": passk, "forking": forking, "noisy_refs": noisy_refs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all", "figures"])
    parser.add_argument("--fresh", action="store_true", help="re-run finished runs too")
    args = parser.parse_args()
    if args.experiment == "figures":  # redraw from the saved numbers; checks nothing
        figures()
        return
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    ok = True
    for name in names:
        print(f"\n##### {name}")
        ok = EXPERIMENTS[name](args.fresh) and ok
    print("\nevery direction holds" if ok else "\nsome direction does not hold (see DOES NOT HOLD above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
