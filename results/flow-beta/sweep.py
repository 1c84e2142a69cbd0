"""beta for velocity errors, measured in the tiny flow world (issue 28, part 2).

Runs `python sail.py --tiny-model flow --iters 2 --beta B --seed S` for every B in BETAS and S in
SEEDS, one at a time, single-threaded (a finished run is kept and not run again), then collects
each run's metrics.jsonl into summary.csv (one row per beta and stage: mean and std over seeds),
steps.csv (loss and implicit_acc per DPO step, mean over seeds) and the table in README.md.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python results/flow-beta/sweep.py            # run + collect
    python results/flow-beta/sweep.py --collect-only

The runs behind summary.csv drew t logit-normal (sail.py then); sail.py draws it uniformly now
(results/flow-t/), so running it again gives other numbers. The check of β under uniform t:

    python results/flow-beta/sweep.py --betas 100,300,1000 --runs runs/flow-beta-uniform \
        --results results/flow-beta/uniform
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BETAS = (100, 300, 1000, 5000)
SEEDS = (0, 1, 2)
STAGES = ("base", "iter_0", "iter_1", "iter_2")
SUMMARY = ("annotator", "annotator/seen", "annotator/unseen", "fidelity", "judge_acc/heldout",
           "self_label_acc")
STEP = ("loss", "implicit_acc", "rewards/margins")
LAST = 10  # a stage's last steps, averaged: where the loss ends


def run_folder(runs, beta, seed):
    return Path(runs) / f"beta{beta}-seed{seed}"


def finished(folder):
    path = folder / "metrics.jsonl"
    return path.exists() and any(json.loads(line).get("stage") == STAGES[-1]
                                 and json.loads(line).get("event") == "summary"
                                 for line in path.read_text().splitlines())


def run_all(runs, betas):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for beta in betas:
        for seed in SEEDS:
            folder = run_folder(runs, beta, seed)
            if finished(folder):
                continue
            if folder.exists():  # an interrupted run: start it again
                subprocess.run(["rm", "-r", str(folder)], check=True)
            started = time.time()
            subprocess.run([sys.executable, "sail.py", "--tiny-model", "flow", "--iters", "2",
                            "--beta", str(beta), "--seed", str(seed), "--out", str(folder)],
                           cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            print(f"beta {beta} seed {seed}: {time.time() - started:.0f} s", flush=True)


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(runs, betas, results):
    rows, steps = [], []
    for beta in betas:
        per_seed = []
        for seed in SEEDS:
            records = [json.loads(line) for line in
                       (run_folder(runs, beta, seed) / "metrics.jsonl").read_text().splitlines()]
            per_seed.append(records)
        for stage in STAGES:
            row = {"beta": beta, "stage": stage, "seeds": len(SEEDS)}
            for name in SUMMARY:
                row[name], row[f"{name} std"] = mean_std(
                    [next((r.get(name) for r in records if r.get("event") == "summary"
                           and r["stage"] == stage), None) for records in per_seed])
            for name in STEP:  # the stage's last LAST steps, averaged per seed, then over seeds
                row[f"{name} last{LAST}"], row[f"{name} last{LAST} std"] = mean_std(
                    [statistics.mean(s[name] for s in stage_steps[-LAST:]) if stage_steps else None
                     for stage_steps in ([r for r in records if "step" in r and r["stage"] == stage]
                                         for records in per_seed)])
            rows.append(row)
            stage_steps = [[r for r in records if "step" in r and r["stage"] == stage]
                           for records in per_seed]
            for i in range(min(len(s) for s in stage_steps)):
                steps.append({"beta": beta, "stage": stage, "step": stage_steps[0][i]["step"],
                              **{name: statistics.mean(s[i][name] for s in stage_steps)
                                 for name in STEP}})
    for name, table in (("summary.csv", rows), ("steps.csv", steps)):
        with open(results / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return rows


def fmt(row, name, digits=1):
    mean, std = row[name], row[f"{name} std"]
    return "" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def logit_bound(row):
    """-log sigma(x) <= ln 2 + max(0, -x), so a mean loss L at accuracy a needs the misordered
    pairs' |logit| to average at least (L - ln 2) / (1 - a): far above 1, the sigmoid is saturated
    (those pairs get the full weight, the well-ordered ones almost none)."""
    loss, acc = row[f"loss last{LAST}"], row[f"implicit_acc last{LAST}"]
    if loss is None or acc >= 1:
        return ""
    return f"{max(0.0, (loss - math.log(2)) / (1 - acc)):.1f}"


def table(rows):
    lines = ["| β | stage | annotator | fidelity | judge_acc/heldout | self_label_acc | "
             f"loss (last {LAST} steps) | implicit_acc (last {LAST}) | margin (last {LAST}) | "
             "misordered pairs' mean logit, at least |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['beta']} | {row['stage']} | {fmt(row, 'annotator')} | "
                     f"{fmt(row, 'fidelity', 3)} | {fmt(row, 'judge_acc/heldout', 3)} | "
                     f"{fmt(row, 'self_label_acc', 3)} | {fmt(row, f'loss last{LAST}', 3)} | "
                     f"{fmt(row, f'implicit_acc last{LAST}', 3)} | "
                     f"{fmt(row, f'rewards/margins last{LAST}', 2)} | {logit_bound(row)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "flow-beta"),
                        help="where the run folders go (default: %(default)s)")
    parser.add_argument("--betas", default=",".join(map(str, BETAS)))
    parser.add_argument("--results", default=str(HERE), help="where summary.csv and steps.csv go")
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args()
    betas = [int(beta) for beta in args.betas.split(",")]
    if not args.collect_only:
        run_all(args.runs, betas)
    Path(args.results).mkdir(exist_ok=True)
    print(table(collect(args.runs, betas, Path(args.results))))


if __name__ == "__main__":
    main()
