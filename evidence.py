"""Evidence: which of SAIL's claims hold in the tiny world? Every control, several seeds.

In the tiny world the simulated annotator is a hidden ground truth, so each claim of the paper
can be tested cheaply and honestly (SPEC section 6). Every condition runs `sail.py` itself with a
few flags, over the same seeds:

    base                   the pretrained model, no training (each run's "base" stage)
    single-round-seed-dpo  Diffusion-DPO on the seed pairs, ref = base, as many steps as SAIL
    iterative-seed-dpo     same rounds and steps as SAIL, reference refreshed each round, seed
                           pairs only: isolates self-labelling from reference refresh
    sail                   SAIL, 4 iterations (past the paper's 3, where it saw a drop; 3 in a
                           variant world)
    sail-no-mixup          SAIL with alpha = 1: self-labelled pairs only, no human seed pairs
    sail-keep-top          SAIL with --keep-top 0.5: only the more confident half of the
                           self-labelled pairs (the one condition where the ranking acts)
    sail-random-pairs      SAIL with random instead of best-worst pairs
    sail-reward-ref-prev   SAIL with --reward-ref prev instead of base
    all-labels-dpo         SAIL's procedure, each self-labelled pair re-labelled by the annotator
    sail-prior-noise       SAIL with --pair-noise prior (PNAPO): flow models only, the flow world

Run:
    python evidence.py                      # the study: 3 seeds, about 25 minutes on 2 CPU cores
    python evidence.py --seeds 5 --out ev5  # more seeds
    python evidence.py --quick              # the smallest size (the test suite runs it)
    python evidence.py --world taste --seeds 5 --jobs 2   # the second study (docs/evidence-2.md)
    python evidence.py --tiny-model flow --seeds 5 --jobs 2   # the flow world (results/evidence-flow/)

--world picks the tiny world (tiny_world.py): shapes (the first study), or a variant that is ONE
change to it, offpolicy or taste; a variant runs the second study's conditions (VARIANT_CONDITIONS)
with 3 SAIL iterations (the paper's count for SD 1.5: two variant worlds with 4 iterations would
not fit the second study's 30 minutes on 2 CPU cores). --jobs 2 runs two sail.py runs at once,
one thread each: measured on 2 busy cores, 1.3x the throughput of one run on both threads. A
run's numbers depend on its thread count (rounding), so compare conditions run the same way.

Writes <out> (default runs/evidence-<time>): results.md and results.csv (per condition: final
annotator score on all, seen and unseen prompts, fidelity, self-label accuracy, the judge's
agreement with the held-out human pairs, mean +- std over seeds; per claim: paired differences
per seed and a verdict; whether confidence ranks right self-labels first), trajectory.png
(annotator score per round, mean line and +-1 std band; needs matplotlib) and
runs/<condition>-seed<s>/ (each run's config, metrics, sample grids and self-labelled pairs; UNet
weights and checkpoints are deleted to keep the folder small).

Verdict rule, fixed before any run: with d the per-seed paired differences (SAIL minus control)
of the final annotator score, mean(d) is "clearly positive" if it exceeds 2 * std(d) / sqrt(n)
and "clearly negative" below minus that. A claim "held" if the sign is clearly the one it
predicts, "did not hold" if clearly the opposite, otherwise it is "inside the noise".
"""

import argparse
import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one progress line per run instead of nested bars

import plumbing  # noqa: E402
import sail  # noqa: E402
import tiny_world  # noqa: E402
import torch  # noqa: E402

# --keep-top for the condition where the ranking acts, fixed before any run: the first study's
# self-labels were right in 56 to 72% of prompts, so about a third were wrong; if Eq. 9's
# confidence ranks them last, keeping the more confident half drops most of them and still leaves
# 9 of 18 self-labelled pairs per round (a quarter of the mixed set, alpha = 0.25, as before).
KEEP_TOP = 0.5


def condition_flags(iters, dpo_steps, extra=()):
    """Each condition's sail.py flags; "base" is read from the runs' base stage instead."""
    sail_run = ["--iters", str(iters), "--dpo-steps", str(dpo_steps), *extra]
    return {
        "single-round-seed-dpo": ["--iters", "0", "--dpo-steps", str(dpo_steps * (iters + 1)),
                                  *extra],
        "iterative-seed-dpo": [*sail_run, "--pairs", "none"],
        "sail": sail_run,
        "sail-no-mixup": [*sail_run, "--mix-alpha", "1"],
        "sail-keep-top": [*sail_run, "--keep-top", str(KEEP_TOP)],
        "sail-random-pairs": [*sail_run, "--pairs", "random"],
        "sail-reward-ref-prev": [*sail_run, "--reward-ref", "prev"],
        "all-labels-dpo": [*sail_run, "--oracle-labels"],
        "sail-prior-noise": [*sail_run, "--pair-noise", "prior"],  # flow models only
    }


CONDITIONS = condition_flags(4, sail.TINY_PRESET["dpo_steps"])  # SAIL: 4 iterations
# The variant worlds (the second study): 3 iterations, the paper's for SD 1.5, to fit 30 minutes.
VARIANT_ITERS = 3
VARIANT_CONDITIONS = ["single-round-seed-dpo", "iterative-seed-dpo", "sail", "all-labels-dpo"]
VARIANT_FLAGS = condition_flags(VARIANT_ITERS, sail.TINY_PRESET["dpo_steps"])
# The flow world (--tiny-model flow): the conditions of the issue that asked for it, with prior-noise
# pairs (PNAPO), 3 SAIL iterations as the variant worlds (a flow run costs about 1.2 DDPM runs)
FLOW_CONDITIONS = ["single-round-seed-dpo", "iterative-seed-dpo", "sail", "sail-prior-noise"]
# The quick size: every condition and every line of the study, at toy cost.
QUICK_CONDITIONS = condition_flags(1, 2, ["--n-candidates", "2", "--k-draws", "1",
                                          "--prompts-per-iter", "2", "--eval-seeds", "1",
                                          "--effective-batch", "8", "--micro-batch", "8"])
CLAIMS = [  # (claim, control, expected sign of SAIL minus control), paired by seed
    ("SAIL improves on the base model", "base", +1),
    ("SAIL beats single-round seed-only DPO with the same steps", "single-round-seed-dpo", +1),
    ("self-labelling adds to reference refresh (SAIL beats iterative seed-only DPO)",
     "iterative-seed-dpo", +1),
    ("mixing human seed pairs in helps (SAIL beats alpha = 1, self-labelled pairs only)",
     "sail-no-mixup", +1),
    (f"ranking by confidence helps (--keep-top {KEEP_TOP} beats SAIL keeping every self-label)",
     "sail-keep-top", -1),
    ("best-worst pairs beat random pairs", "sail-random-pairs", +1),
    ("reward reference base vs prev (the paper makes no claim)", "sail-reward-ref-prev", 0),
    ("all-labels DPO beats SAIL (the annotator labels every pair SAIL saw)", "all-labels-dpo", -1),
    ("prior-noise pairs (PNAPO) beat fresh noise (--pair-noise prior beats SAIL)",
     "sail-prior-noise", -1),
]
METRICS = ["annotator", "annotator/seen", "annotator/unseen", "fidelity", "self_label_acc",
           "judge_acc/heldout"]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=f"runs/evidence-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="output folder; must not exist (default: runs/evidence-<time>)")
    parser.add_argument("--world", default="shapes", help="the tiny world: shapes (the first "
                        "study) or a variant of the second, offpolicy or taste (default: shapes)")
    parser.add_argument("--tiny-model", default="ddpm", choices=["ddpm", "flow"],
                        help="the tiny world's base: ddpm, or flow (its rectified-flow twin)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per condition")
    parser.add_argument("--conditions", default=None, help="comma-separated subset of: "
                        + ", ".join(CONDITIONS) + " (default: all but sail-prior-noise; a variant "
                        "world: " + ", ".join(VARIANT_CONDITIONS) + "; the flow world: "
                        + ", ".join(FLOW_CONDITIONS) + ")")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, one thread each (default: 1, all threads)")
    parser.add_argument("--quick", action="store_true", help="toy size, for the test suite")
    args = parser.parse_args(argv)
    if args.world not in tiny_world.WORLDS:
        raise sail.InputError(f"--world: unknown world {args.world} "
                              f"(known: {', '.join(tiny_world.WORLDS)})")
    if args.tiny_model == "flow" and args.world != "shapes":
        raise sail.InputError("--tiny-model flow: the flow world is the shapes world's")
    default = (FLOW_CONDITIONS if args.tiny_model == "flow" else VARIANT_CONDITIONS
               if args.world != "shapes" else [c for c in CONDITIONS if c != "sail-prior-noise"])
    args.conditions = [c.strip() for c in (args.conditions or ",".join(default)).split(",")
                       if c.strip()]
    unknown = [c for c in args.conditions if c not in CONDITIONS]
    if unknown:
        raise sail.InputError(f"--conditions: unknown condition(s) {', '.join(unknown)} "
                              f"(known: {', '.join(CONDITIONS)})")
    if args.seeds < 1:
        raise sail.InputError("--seeds must be >= 1")
    if args.jobs < 1:
        raise sail.InputError("--jobs must be >= 1")
    if Path(args.out).exists():
        raise sail.InputError(f"--out {args.out}: already exists; choose a new folder")
    return args


def run_condition(name, seed, args, runs):
    """One sail.py run in this process -> (its per-stage summaries {stage: summary}, seconds)."""
    started = time.time()
    flags = (QUICK_CONDITIONS if args.quick else VARIANT_FLAGS if args.world != "shapes"
             or args.tiny_model == "flow" else CONDITIONS)[name]
    out = runs / f"{name}-seed{seed}"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        code = sail.main(["--tiny", "--tiny-world", args.world, "--tiny-model", args.tiny_model,
                          "--seed", str(seed), "--out", str(out), *flags])
    (out / "log.txt").write_text(log.getvalue())
    if code != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{log.getvalue()}")
    for weights in [out / "tiny_base", out / "checkpoints", *out.glob("iter_*/unet"),
                    *out.glob("iter_*/transformer")]:
        shutil.rmtree(weights, ignore_errors=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["stage"]: r for r in records if r.get("event") == "summary"}, time.time() - started


def one_thread():
    """A worker's torch uses one thread: two single-thread runs beat one run on two threads."""
    torch.set_num_threads(1)


def run_all(args, seeds, runs):
    """Every (condition, seed) run, yielded as (condition, seed, (summaries, seconds)) as each
    ends: in this process, or in `args.jobs` worker processes at once."""
    tasks = [(condition, seed) for seed in seeds for condition in args.conditions]
    if args.jobs == 1:
        for condition, seed in tasks:
            yield condition, seed, run_condition(condition, seed, args, runs)
        return
    # spawn, not fork: a forked child of a process that has used OpenMP threads can hang
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=one_thread) as pool:
        running = {pool.submit(run_condition, c, s, args, runs): (c, s) for c, s in tasks}
        for future in as_completed(running):
            yield (*running[future], future.result())


def mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(differences, expected=+1):
    """The rule of the module docstring: the sign of mean(d) if it clears 2 standard errors."""
    if len(differences) < 2:
        return "one seed: no verdict"
    mean, std = mean_std(differences)
    margin = 2 * std / math.sqrt(len(differences))
    sign = +1 if mean > margin else -1 if mean < -margin else 0
    if expected == 0:
        return {+1: "no claim; SAIL higher", -1: "no claim; SAIL lower", 0: "inside the noise"}[sign]
    return {expected: "held", -expected: "did not hold", 0: "inside the noise"}[sign]


def last_round(stages):
    """{"base", "iter_0", ..., "iter_I"} -> I."""
    return max(int(stage[5:]) for stage in stages if stage != "base")


def final(stages):
    return stages[f"iter_{last_round(stages)}"]


def summarise(results, seeds):
    """results[condition][seed] = {stage: summary} -> table rows and claim rows."""
    any_condition = next(iter(results))
    per_condition = {"base": {s: results[any_condition][s]["base"] for s in seeds}}
    per_condition.update({c: {s: final(results[c][s]) for s in seeds} for c in results})
    rows = []
    for condition, by_seed in per_condition.items():
        row = {"condition": condition}
        for metric in METRICS:
            if metric == "self_label_acc":  # mean over the rounds of each run, then over seeds
                values = [mean_std([st.get(metric) for st in results[condition][s].values()])[0]
                          for s in seeds] if condition in results else []
            else:
                values = [by_seed[s].get(metric) for s in seeds]
            row[metric], row[metric + " std"] = mean_std(values)
        rows.append(row)
    claims = []
    if "sail" in results:
        for claim, control, expected in CLAIMS:
            if control not in per_condition:
                continue
            row = {"claim": claim, "control": control}
            for metric in ("annotator", "annotator/seen", "annotator/unseen", "fidelity"):
                d = [per_condition["sail"][s][metric] - per_condition[control][s][metric]
                     for s in seeds]
                row[metric], row[metric + " std"] = mean_std(d)
                row[metric + " per seed"] = d
            row["verdict"] = verdict(row["annotator per seed"], expected)
            claims.append(row)
        sail_runs = [results["sail"][s] for s in seeds]
        last = last_round(sail_runs[0])
        if last >= 2:  # the paper saw its 4th iteration fall: does the last one still help?
            last, before = f"iter_{last}", f"iter_{last - 1}"
            d = [run[last]["annotator"] - run[before]["annotator"] for run in sail_runs]
            mean, std = mean_std(d)
            claims.append({"claim": f"SAIL still improves at its last iteration ({last} minus "
                                    f"{before}; the paper saw its 4th fall)", "control": before,
                           "annotator": mean,
                           "annotator std": std, "annotator per seed": d, "verdict": verdict(d)})
    return rows, claims


def per_round_lines(results, seeds, metric):
    """A markdown table: one row per condition, one column per round, mean ± std over seeds."""
    if not results:
        return ["(no condition with self-labelled pairs)"]
    rounds = max(last_round(runs[seeds[0]]) for runs in results.values())
    lines = ["| condition | base | " + " | ".join(f"round {i}" for i in range(rounds + 1)) + " |",
             "|---|" + "---|" * (rounds + 2)]
    for condition, runs in results.items():
        cells = []
        for stage in ["base", *(f"iter_{i}" for i in range(rounds + 1))]:
            values = [runs[s][stage].get(metric) for s in seeds if stage in runs[s]]
            mean, std = mean_std(values)
            cells.append("" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}")  # no such round
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return lines


def confidence_ranking(runs, seeds):
    """Does Eq. 9's confidence put right self-labels first? Over every round of SAIL's runs
    (condition "sail"): the annotator's agreement with the pairs --keep-top KEEP_TOP keeps (the
    more confident) and with those it drops -> ((mean, count), (mean, count))."""
    kept, dropped = [], []
    for seed in seeds:
        for file in sorted((runs / f"sail-seed{seed}").glob("iter_*/pairs.json")):
            pairs = [plumbing.pair_paths(p, lambda name: str(file.parent / name))
                     for p in json.loads(file.read_text())]
            # ranked mixup with alpha = 1 adds no seed pairs: what remains is the kept top
            top = sail.ranked_mixup(pairs, [], 1.0, random.Random(0), KEEP_TOP)
            agrees = tiny_world.annotator_agrees(pairs).tolist()
            for pair, agree in zip(pairs, agrees):
                (kept if pair in top else dropped).append(float(agree))
    return [(mean_std(values)[0], len(values)) for values in (kept, dropped)]


def write_tables(out, args, rows, claims, results, seeds, seconds):
    fmt = lambda m, s: "" if math.isnan(m) else f"{m:.2f} ± {s:.2f}"  # noqa: E731
    model = " (flow)" if args.tiny_model == "flow" else ""  # the rectified-flow base
    lines = [f"Tiny world '{args.world}'{model}, {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{seconds / 60:.1f} min ({args.jobs} run(s) at once). Final stage of each "
             "condition; mean ± std over seeds.", "",
             "| condition | annotator | seen | unseen | fidelity | self-label acc | "
             "judge_acc/heldout |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['condition']} | " + " | ".join(fmt(r[m], r[m + ' std'])
                                                         for m in METRICS) + " |")
    lines += ["", "Paired differences per seed, SAIL minus control (annotator score, final stage):",
              "", "| claim | all prompts | seen | unseen | per seed | verdict |",
              "|---|---|---|---|---|---|"]
    for c in claims:
        cells = [fmt(c[m], c[m + " std"]) if m in c else "" for m in
                 ("annotator", "annotator/seen", "annotator/unseen")]
        per_seed = ", ".join(f"{d:+.2f}" for d in c["annotator per seed"])
        lines.append(f"| {c['claim']} | " + " | ".join(cells) + f" | {per_seed} | {c['verdict']} |")
    lines += ["", "Hidden annotator score per round (round 0 = step 0):", "",
              *per_round_lines(results, seeds, "annotator"),
              "", "Self-label accuracy per round (the annotator agrees with the pair SAIL labelled):",
              "", *per_round_lines({c: r for c, r in results.items()
                                    if c not in ("single-round-seed-dpo", "iterative-seed-dpo")},
                                   seeds, "self_label_acc")]
    if "sail" in results:
        (top, n_top), (rest, n_rest) = confidence_ranking(out / "runs", seeds)
        lines += ["", f"Does confidence rank right self-labels first? Annotator agreement with "
                  f"SAIL's self-labelled pairs, every round and seed: the more confident "
                  f"{KEEP_TOP:g} (--keep-top {KEEP_TOP:g} keeps them) {top:.2f} ({n_top} pairs), "
                  f"the rest {rest:.2f} ({n_rest} pairs)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "name", *[f"{m}{s}" for m in METRICS for s in ("", " std")],
                         "verdict"])
        for r in rows:
            writer.writerow(["condition", r["condition"],
                             *[r[m + s] for m in METRICS for s in ("", " std")], ""])
        for c in claims:
            writer.writerow(["claim:" + c["control"], c["claim"],
                             *[c.get(m + s, "") for m in METRICS for s in ("", " std")],
                             c["verdict"]])


def plot_trajectories(out, world, results, seeds):
    """Annotator score per round, mean line and +-1 std band per condition (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("trajectory.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    figure, axis = plt.subplots(figsize=(8, 5))
    end = max(last_round(runs[seeds[0]]) for runs in results.values())
    for condition, runs in results.items():
        stages = ["base", *(f"iter_{i}" for i in range(last_round(runs[seeds[0]]) + 1))]
        x = list(range(-1, len(stages) - 1))
        if condition == "single-round-seed-dpo":  # one round with all the steps: plot at the end
            x = [-1, end]
        stats = [mean_std([runs[s][stage]["annotator"] for s in seeds]) for stage in stages]
        mean = [m for m, _ in stats]
        band = [(m - s, m + s) for m, s in stats]
        line, = axis.plot(x, mean, marker="o", label=condition)
        axis.fill_between(x, [b[0] for b in band], [b[1] for b in band], alpha=0.15,
                          color=line.get_color())
    axis.set_xlabel("round (-1 = base, 0 = step 0, i = SAIL iteration i)")
    axis.set_ylabel("hidden annotator score (0-100)")
    axis.set_title(f"Tiny world '{world}': annotator score per round, mean ± std over "
                   f"{len(seeds)} seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "trajectory.png", dpi=110)


def main(argv=None):
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except sail.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True)
    seeds = list(range(args.seeds))
    started = time.time()
    results = {c: {} for c in args.conditions}
    total = len(args.conditions) * len(seeds)
    for done, (condition, seed, (stages, seconds)) in enumerate(run_all(args, seeds, runs), 1):
        results[condition][seed] = stages
        print(f"[{done}/{total}] {condition} seed {seed}: final annotator "
              f"{final(stages)['annotator']:.2f} ({seconds:.0f} s)", flush=True)
    tiny_world.use_world(args.world)  # its annotator checks the ranking of SAIL's self-labels
    rows, claims = summarise(results, seeds)
    write_tables(out, args, rows, claims, results, seeds, time.time() - started)
    plot_trajectories(out, args.world, results, seeds)
    print((out / "results.md").read_text())
    print(f"done in {(time.time() - started) / 60:.1f} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
