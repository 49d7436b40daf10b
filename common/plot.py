"""Plot finished runs side by side from their metrics.jsonl: training curves and pass@k curves.

    python -m common.plot runs/sft runs/grpo runs/ppo [--out runs/compare.png] [--passk-out runs/passk.png]
                          [--tokens-out runs/tokens.png] [--labels SFT GRPO PPO] [--smooth 5]

Three figures (PNG, matplotlib's non-interactive Agg backend, so it works over ssh and in CI):

- compare.png, one panel per quantity over optimizer steps, one line per run: sampled pass@1
  (`sampled_accuracy`, the rollouts' mean correctness), `entropy`, `completion_length`, `kl`
  (to the reference) and wall-clock (the running sum of `step_time`). Per-step curves are noisy,
  so they are drawn as a trailing mean over `--smooth` steps (the axis label says so); wall-clock
  is a running sum and needs no smoothing. A run that never logs a key (sft.py has no rollouts,
  so no sampled_accuracy, entropy or kl) is left out of that panel, and the panel names it.
- passk.png: each run's final eval record as a pass@k curve, k on a log2 axis (1, 2, 4, ...,
  up to whatever the run evaluated, e.g. 64 with `evaluate(..., num_samples=64)`). A flat curve
  means extra samples find nothing new; a curve that keeps rising means the model can still
  reach answers it rarely samples. Runs without an eval record are skipped with a note.
- tokens.png: the token diagnostic every RL script logs (`tokens/...`): where the weight |A| of the
  gradient sits by the sampling probability of the token and the sign of A, and Cov(log pi, A), whose
  sign predicts whether entropy falls (> 0) or rises. "Know which tokens your loss promotes or
  suppresses" (the survey "rl与sft").

One more figure per script, drawn from the numbers `python benchmarks/experiments.py compare` saves
(docs/figures/compare.json) rather than from run folders: `plot_learning_curves` writes
curve_<script>.png (`python benchmarks/experiments.py figures` redraws them without training).

matplotlib is an optional extra (`pip install -e '.[plot]'`); the reading helpers
(`load_runs`, `series`, `passk_points`) need only the standard library.
"""

import argparse
import json
import math
import os
import re
import sys
import textwrap
from typing import NamedTuple

from common.tracking import read_metrics

# The panels of compare.png: (metrics.jsonl key, panel title, y label, cumulative?).
PANELS = [
    ("sampled_accuracy", "sampled pass@1", "mean correctness of rollouts", False),
    ("entropy", "entropy", "nats per token", False),
    ("completion_length", "completion length", "tokens", False),
    ("kl", "KL to reference", "nats per token", False),
    ("step_time", "wall-clock", "seconds of training (sum of step_time)", True),
]
PASSK_KEY = re.compile(r"pass@(\d+)")  # full match only: "pass@8/carry" is a per-slice key, not the curve


def load_runs(paths: list[str], labels: list[str] | None = None) -> dict[str, tuple[list[dict], dict | None]]:
    """Read each run folder's metrics.jsonl: {label: (step records, last eval record or None)}.

    Labels default to the folder names (runs/grpo -> "grpo"); if two folders share a name
    (a/grpo, b/grpo) the full paths are used, so no run silently replaces another.
    """
    if labels is None:
        names = [os.path.basename(os.path.normpath(p)) for p in paths]
        labels = names if len(set(names)) == len(names) else [os.path.normpath(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    runs = {}
    for label, path in zip(labels, paths):
        records = read_metrics(path)
        steps = [r for r in records if "event" not in r]
        evals = [r for r in records if r.get("event") == "eval"]
        runs[label] = (steps, evals[-1] if evals else None)
    return runs


def series(steps: list[dict], key: str, smooth: int = 1, cumulative: bool = False) -> tuple[list, list]:
    """One curve from the step records: (steps, values) with missing, null and non-finite values dropped.

    smooth = n: each value becomes the mean of itself and the n - 1 kept values before it (a trailing
    mean, so a point never looks ahead; the first points average what there is). cumulative: a running
    sum instead (wall-clock from step_time).

    >>> rows = [{"step": 1, "t": 1.0}, {"step": 2, "t": None}, {"step": 3, "t": 3.0}, {"step": 4, "t": 5.0}]
    >>> series(rows, "t", smooth=2)
    ([1, 3, 4], [1.0, 2.0, 4.0])
    >>> series(rows, "t", cumulative=True)
    ([1, 3, 4], [1.0, 4.0, 9.0])
    """
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    points = [(r["step"], float(r[key])) for r in steps
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    xs = [s for s, _ in points]
    values = [v for _, v in points]
    if cumulative:
        total, ys = 0.0, []
        for v in values:
            total += v
            ys.append(total)
        return xs, ys
    ys = []
    for i in range(len(values)):
        window = values[max(0, i - smooth + 1): i + 1]
        ys.append(sum(window) / len(window))
    return xs, ys


def passk_points(eval_record: dict | None) -> tuple[list[int], list[float]]:
    """The pass@k curve of an eval record, ordered by k: ([1, 2, 4, ...], [pass@1, pass@2, ...]).

    Per-slice keys ("pass@4/carry") and null values are left out; no record gives ([], []).

    >>> passk_points({"event": "eval", "accuracy": 0.9, "pass@2": 0.8, "pass@1": 0.5, "pass@2/carry": 0.7})
    ([1, 2], [0.5, 0.8])
    """
    if not eval_record:
        return [], []
    points = sorted((int(m.group(1)), float(v)) for key, v in eval_record.items()
                    if (m := PASSK_KEY.fullmatch(key)) and isinstance(v, (int, float)))
    return [k for k, _ in points], [v for _, v in points]


# Sizes chosen so the 1200 x 700 px figure stays legible when a page shrinks it to ~800 px wide.
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 11, "axes.grid": True, "grid.alpha": 0.3}


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line exit naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install -e '.[plot]'")
    matplotlib.use("Agg")  # no display needed: we only write files
    import matplotlib.pyplot as plt

    return plt


def plot_compare(runs: dict, out: str, smooth: int = 5):
    """compare.png: a 2 x 3 grid, one panel per PANELS entry and the legend in the last cell."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=(12, 7), dpi=100)
        colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # a run keeps its colour in every panel
        missing = {label: [] for label in runs}  # label -> titles of the panels it has no data for
        for ax, (key, title, ylabel, cumulative) in zip(axes.flat, PANELS):
            for label, (steps, _) in runs.items():
                xs, ys = series(steps, key, smooth=smooth, cumulative=cumulative)
                if xs:
                    ax.plot(xs, ys, color=colors[label], linewidth=1.5)
                else:
                    missing[label].append(title)
            ax.set_title(title)
            ax.set_xlabel("step")
            # Say what was done to the curve, so nobody reads a smoothed line as raw data.
            ax.set_ylabel(ylabel + (f"\n(trailing mean of {smooth} steps)" if smooth > 1 and not cumulative else ""))
        legend_ax = axes.flat[-1]
        legend_ax.axis("off")
        legend_ax.legend([plt.Line2D([], [], color=colors[label], linewidth=2.5) for label in runs], list(runs),
                         loc="upper center", title="run", frameon=False)
        # A run with no line in a panel is named here rather than inside the panel, where the note
        # would sit on top of the curves.
        notes = [f"{label}: no {', '.join(titles)}" for label, titles in missing.items() if titles]
        if notes:
            legend_ax.text(0.5, 0.0, "\n".join(textwrap.fill(n, 40) for n in notes), transform=legend_ax.transAxes,
                           ha="center", va="bottom", color="0.3")
        fig.suptitle("training curves from metrics.jsonl", fontsize=13)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)


def plot_tokens(runs: dict, out: str, smooth: int = 5) -> bool:
    """tokens.png: the token diagnostic of each run (common/tracking.py token_diagnostics). Left: the share
    of |A| (the gradient's weight) on each sampling-probability bucket, A > 0 solid, A < 0 dashed; right:
    Cov(log pi, A), > 0 predicts that entropy falls. One row per run; False if no run logged it."""
    plt = _pyplot()
    logged = {label: steps for label, (steps, _) in runs.items() if any("tokens/cov_logp_adv" in r for r in steps)}
    if not logged:
        return False
    buckets = ["p<0.1", "p0.1-0.5", "p0.5-0.9", "p>0.9"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(logged), 2, figsize=(12, 3.2 * len(logged)), dpi=100, squeeze=False)
        for row, (label, steps) in zip(axes, logged.items()):
            for i, bucket in enumerate(buckets):
                for sign, style in (("pos", "-"), ("neg", "--")):
                    xs, ys = series(steps, f"tokens/mass/{bucket}/{sign}", smooth=smooth)
                    row[0].plot(xs, ys, style, color=f"C{i}", label=f"{bucket}, A {'>' if sign == 'pos' else '<'} 0")
            row[0].set_title(f"{label}: share of |A| by sampling probability")
            row[0].set_ylabel(f"share of |A|\n(trailing mean of {smooth} steps)" if smooth > 1 else "share of |A|")
            xs, ys = series(steps, "tokens/cov_logp_adv", smooth=smooth)
            row[1].plot(xs, ys, color="C4")
            row[1].axhline(0, color="0.6", linewidth=0.8)
            row[1].set_title(f"{label}: Cov(log pi, A) (> 0: entropy falls)")
            for ax in row:
                ax.set_xlabel("step")
        axes[0][0].legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    return True


def plot_passk(runs: dict, out: str) -> bool:
    """passk.png: pass@k against k (log2 axis), one line per run with pass@k in its eval record.

    Returns False (and writes nothing) when no run has a pass@k curve.
    """
    curves = {}
    for label, (_, eval_record) in runs.items():
        ks, values = passk_points(eval_record)
        if ks:
            curves[label] = (ks, values)
        else:
            print(f"note: {label} has no eval record with pass@k; left out of the pass@k plot")
    if not curves:
        return False
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
        for i, (label, (ks, values)) in enumerate(curves.items()):
            ax.plot(ks, values, marker="o", color=f"C{i % 10}", label=label, linewidth=1.5)
        all_ks = sorted({k for ks, _ in curves.values() for k in ks})
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ks, [str(k) for k in all_ks])  # plain 1, 2, 4, ... instead of 2^0, 2^1, ...
        ax.minorticks_off()
        ax.set_xlabel("k (samples per prompt, log2 scale)")
        ax.set_ylabel("pass@k (unbiased, T = 1)")
        ax.set_title("pass@k of the final eval record")
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
    return True


# ---- one script's learning curve, from docs/figures/compare.json --------------------------------------------

# The scripts `python benchmarks/experiments.py compare` runs: script stem -> its label there. Its runs are
# runs/cmp_<stem>; every RL run starts from runs/cmp_sft, and runs/cmp_sft_more is 200 more SFT steps from it.
SCRIPTS = {"sft": "SFT", "grpo": "GRPO", "reinforce": "REINFORCE (RLOO)", "ppo": "PPO",
           "sft_rl_mixed": "SFT+RL (weighted)"}
SFT_RUN, SFT_MORE_RUN = "runs/cmp_sft", "runs/cmp_sft_more"
SCRIPT_COLORS = {"sft": "C4", "grpo": "C0", "reinforce": "C1", "ppo": "C2", "sft_rl_mixed": "C3"}  # as in compare.png
START_COLOR = "0.45"  # the SFT model at step 1200, grey in every curve_<script>.png
# Per-step keys drawn when compare.json holds a run's step records under "curves" (today's json does not).
STEP_KEYS = [("sampled_accuracy", "sampled pass@1 of the rollouts (trailing mean of 5 steps)"),
             ("eval_accuracy", "greedy accuracy, quick check on 64 prompts")]


class CurvePoint(NamedTuple):
    """One evaluated point of a learning curve: where it sits, what it is, and its eval record."""

    x: int  # optimizer steps from where the script starts
    label: str
    run: str  # the run folder, the key of compare.json's "runs"
    record: dict  # its eval record: step, accuracy (greedy), pass@1, ..., pass@64


def learning_curve_points(compare: dict, script: str) -> list[CurvePoint]:
    """The evaluated points of one script's curve in compare.json, ordered by x.

    x counts optimizer steps from where the script starts: an RL run from the SFT model (x = 0), sft.py
    from the base model, whose own eval is not recorded (x = 1200, then 1400 after 200 more steps).

    >>> c = {"runs": {"runs/cmp_sft": {"step": 1200, "pass@1": 0.6}, "runs/cmp_sft_more": {"step": 200, "pass@1": 0.6},
    ...               "runs/cmp_grpo": {"step": 200, "pass@1": 0.95}}}
    >>> [(p.x, p.label) for p in learning_curve_points(c, "grpo")]
    [(0, 'SFT start'), (200, 'GRPO, 200 steps')]
    >>> [(p.x, p.label, p.run) for p in learning_curve_points(c, "sft")]
    [(1200, 'SFT, 1200 steps', 'runs/cmp_sft'), (1400, 'SFT, 200 more steps', 'runs/cmp_sft_more')]
    """
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; one of {list(SCRIPTS)}")
    run = SFT_MORE_RUN if script == "sft" else f"runs/cmp_{script}"
    for needed in (SFT_RUN, run):
        if needed not in compare["runs"]:
            raise ValueError(f"compare.json has no eval record for {needed}: run `python benchmarks/experiments.py "
                             "compare`")
    start, end = compare["runs"][SFT_RUN], compare["runs"][run]
    if script == "sft":
        return [CurvePoint(start["step"], f"SFT, {start['step']} steps", SFT_RUN, start),
                CurvePoint(start["step"] + end["step"], f"SFT, {end['step']} more steps", run, end)]
    return [CurvePoint(0, "SFT start", SFT_RUN, start),
            CurvePoint(end["step"], f"{SCRIPTS[script]}, {end['step']} steps", run, end)]


def plot_learning_curve(compare: dict, script: str, out: str):
    """curve_<script>.png: held-out pass@1 (and greedy accuracy) against steps, next to the pass@k curves.

    Left: the evaluated points (grey: the SFT model every RL run starts from), joined by a dashed line
    because nothing between them was evaluated, and the teacher's accuracy. If compare.json holds the
    run's step records under "curves" ({run: [{"step": 1, "sampled_accuracy": ...}, ...]}), the STEP_KEYS
    are drawn over it. Right: pass@k of the same eval records, k on a log2 axis.
    """
    points = learning_curve_points(compare, script)
    colors = [START_COLOR, SCRIPT_COLORS[script]]
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, (ax, ax_k) = plt.subplots(1, 2, figsize=(12, 5.6), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
        xs = [p.x for p in points]
        for p, color in zip(points, colors):
            ax.plot([p.x], [p.record["pass@1"]], "o", color=color, markersize=9,
                    label=f"pass@1: {p.label} ({p.run})", zorder=3)
            if "accuracy" in p.record:
                ax.plot([p.x], [p.record["accuracy"]], "D", color=color, markersize=7, markerfacecolor="white",
                        markeredgewidth=1.5, zorder=3)
            ax.annotate(f"{p.record['pass@1']:.3f}", (p.x, p.record["pass@1"]), textcoords="offset points",
                        xytext=(0, -18), ha="center", fontsize=10)
        drawn, lowest = set(), min(p.record["pass@1"] for p in points) - 0.08  # room for the value labels
        for p, color in zip(points, colors):
            steps = compare.get("curves", {}).get(p.run, [])
            start = p.x - p.record["step"]  # the run's own step 0 on this axis
            if start < 0:  # the SFT start on an RL page: its training happened before this axis begins
                continue
            for (key, key_label), style in zip(STEP_KEYS, ("-", ":")):
                sx, sy = series(steps, key, smooth=5 if key == "sampled_accuracy" else 1)
                if sx:
                    ax.plot([start + s for s in sx], sy, color=color, linewidth=1.2, alpha=0.8, linestyle=style,
                            label=None if key in drawn else key_label, zorder=2)
                    drawn.add(key)
                    lowest = min(lowest, min(sy) - 0.02)
        ax.plot([], [], "D", color="0.3", markerfacecolor="white", label="greedy accuracy (same colour = same run)")
        ax.plot(xs, [p.record["pass@1"] for p in points], color="0.6", linestyle="--", linewidth=1, zorder=1,
                label="joins the points: nothing evaluated in between")
        teacher = compare.get("teacher_accuracy")
        if teacher is not None:
            ax.axhline(teacher, color="black", linestyle=":", linewidth=1.2,
                       label=f"teacher's demonstrations right: {teacher:.3f}")
        ax.set_xlim(-0.08 * max(xs), 1.1 * max(xs))
        ax.set_ylim(min(0.5, lowest), 1.03)
        ax.set_xlabel("optimizer steps" + (" from the SFT model" if script != "sft" else " from the base model"))
        last = points[-1].record
        ax.set_ylabel("held-out accuracy" + (f" ({last['num_prompts']} prompts)" if "num_prompts" in last else ""))
        ax.set_title(f"{SCRIPTS[script]}: held-out pass@1"
                     + (f" ({last['num_samples']} samples, T = 1)" if "num_samples" in last else ""))
        # Below both panels, where it cannot cover a point (SFT's sit on the teacher's line).
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 0.07), ncol=3,
                   fontsize=9, frameon=False)
        if not drawn:
            ax.text(0.45, 0.97, "compare.json holds no per-step records:\nonly the evaluated points are drawn",
                    transform=ax.transAxes, ha="center", va="top", fontsize=9, color="0.4")
        for p, color in zip(points, colors):
            ks, values = passk_points(p.record)
            ax_k.plot(ks, values, marker="o", color=color, linewidth=1.5, label=p.label)
        all_ks = sorted({k for p in points for k in passk_points(p.record)[0]})
        ax_k.set_xscale("log", base=2)
        ax_k.set_xticks(all_ks, [str(k) for k in all_ks])
        ax_k.minorticks_off()
        ax_k.set_xlabel("k (samples per prompt, log2 scale)")
        ax_k.set_ylabel("pass@k (unbiased, T = 1)")
        ax_k.set_title("pass@k of the same evaluations")
        ax_k.legend(loc="lower right", fontsize=9)
        fig.suptitle("data: docs/figures/compare.json, from `python benchmarks/experiments.py compare`",
                     fontsize=10, color="0.3", y=0.02, va="bottom")
        fig.tight_layout(rect=(0, 0.17, 1, 1))
        fig.savefig(out)
        plt.close(fig)


def plot_learning_curves(compare_json: str, out_dir: str, scripts: list[str] | None = None) -> list[str]:
    """curve_<script>.png in out_dir for each script (default: all of SCRIPTS) from a saved compare.json.

    Returns the paths written. Needs only the json, not the run folders, so it works in a fresh clone.
    """
    with open(compare_json) as f:
        compare = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for script in scripts or list(SCRIPTS):
        out = os.path.join(out_dir, f"curve_{script}.png")
        plot_learning_curve(compare, script, out)
        written.append(out)
    return written


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m common.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<run_name>), each with a metrics.jsonl")
    parser.add_argument("--out", default="runs/compare.png", help="training-curve figure to write")
    parser.add_argument("--passk-out", default="runs/passk.png", help="pass@k figure to write")
    parser.add_argument("--tokens-out", default="runs/tokens.png",
                        help="token-diagnostic figure to write (which tokens the loss pushes up or down)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: folder names)")
    parser.add_argument("--smooth", type=int, default=5, help="trailing-mean window in steps (1: raw curves)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one label per run: {len(args.labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    for path in args.runs:
        if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
            parser.error(f"{path} has no metrics.jsonl (is it a run folder?)")
    _pyplot()  # fail in one line before reading anything if matplotlib is missing
    runs = load_runs(args.runs, args.labels)
    for path in (args.out, args.passk_out, args.tokens_out):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plot_compare(runs, args.out, smooth=args.smooth)
    print(f"training curves written to {args.out}")
    if plot_passk(runs, args.passk_out):
        print(f"pass@k curves written to {args.passk_out}")
    else:
        print("no run has pass@k in an eval record; no pass@k plot written")
    if plot_tokens(runs, args.tokens_out, smooth=args.smooth):
        print(f"token diagnostic written to {args.tokens_out}")


if __name__ == "__main__":
    main()
