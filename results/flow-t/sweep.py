"""t's density for flow models, measured in the tiny flow world (issue 28, part 3).

sail.py draws a flow model's t uniformly (sail.draw_timesteps) for Eq. DPO's loss and for Eq. 8's
K draws alike, as these runs chose; SD3's training density is logit-normal (diffusers' SD3 script
default; its FLUX script's is uniform). This runs `sail.py --tiny-model flow --iters 2 --seed S`
in-process with each call site's draw chosen: the loss's (dpo_step_data) and Eq. 8's (everything
else) each logit-normal (ln) or uniform (u, sail.py's own), for every variant in VARIANTS and S in
SEEDS, two runs at a time, one thread each; then writes summary.csv (mean and std over seeds per
variant, after iter_2) and the tables in README.md. A finished run is kept and not run again.

    python results/flow-t/sweep.py                  # run + collect (about 8 minutes on 2 cores)
    python results/flow-t/sweep.py --collect-only
"""

import argparse
import csv
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the runs' own lines, not their bars
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VARIANTS = {"ln/ln": ("ln", "ln"), "u/u (sail.py)": ("u", "u"), "u/ln": ("u", "ln")}  # loss/Eq. 8
SEEDS = (0, 1, 2, 3, 4)
METRICS = ("annotator", "annotator/seen", "annotator/unseen", "fidelity", "judge_acc/heldout",
           "self_label_acc")


def folder(runs, variant, seed):
    loss, eq8 = VARIANTS[variant]
    return Path(runs) / f"loss-{loss}-eq8-{eq8}-seed{seed}"


def one_run(variant, seed, runs):
    """One in-process run, draw_timesteps chosen per call site (this worker's own sail)."""
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import sail
    densities, site = dict(zip(("loss", "eq8"), VARIANTS[variant])), ["eq8"]
    real_draw, real_step_data = sail.draw_timesteps, sail.dpo_step_data

    def draw_timesteps(scheduler, n, generator):
        if densities[site[0]] == "u":
            return real_draw(scheduler, n, generator)
        T = scheduler.config.num_train_timesteps  # t = floor(T u), u ~ logit-normal(0, 1)
        return (torch.sigmoid(torch.randn(n, generator=generator)) * T).long().clamp(max=T - 1)

    def dpo_step_data(*args, **kwargs):
        site[0] = "loss"
        try:
            return real_step_data(*args, **kwargs)
        finally:
            site[0] = "eq8"
    sail.draw_timesteps, sail.dpo_step_data = draw_timesteps, dpo_step_data
    out = folder(runs, variant, seed)
    if (out / "iter_2" / "summary.json").exists():
        return
    if out.exists():
        raise SystemExit(f"{out}: an unfinished run; remove it and run again")
    assert sail.main(["--tiny", "--tiny-model", "flow", "--iters", "2", "--seed", str(seed),
                      "--out", str(out)]) == 0


def collect(runs):
    rows = []
    finals = {variant: [json.loads((folder(runs, variant, s) / "iter_2" / "summary.json").read_text())
                        for s in SEEDS] for variant in VARIANTS}  # per variant, per seed
    for variant in VARIANTS:
        row = {"variant": variant}
        for m in METRICS:
            values = [f[m] for f in finals[variant]]
            row[m], row[m + " std"] = statistics.mean(values), statistics.stdev(values)
        rows.append(row)
    with open(HERE / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = [json.loads((folder(runs, "ln/ln", s) / "base" / "summary.json").read_text())
            for s in SEEDS]
    lines = [f"| t density, loss / Eq. 8 (after iter_2, seeds {SEEDS[0]}-{SEEDS[-1]}) | "
             + " | ".join(METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|",
             "| base | " + " | ".join(f"{statistics.mean(b[m] for b in base):.3f}" if m in base[0]
                                     else "" for m in METRICS) + " |"]
    lines += [f"| {r['variant']} | " + " | ".join(f"{r[m]:.3f} ± {r[m + ' std']:.3f}" for m in METRICS)
              + " |" for r in rows]
    lines += ["", "| variant minus ln/ln | " + " | ".join(PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|"]
    lines += [f"| {variant} | " + " | ".join(paired(finals, variant, m) for m in PAIRED) + " |"
              for variant in list(VARIANTS)[1:]]
    return "\n".join(lines)


PAIRED = ("annotator", "fidelity", "judge_acc/heldout")


def paired(finals, variant, metric):
    """variant minus ln/ln, paired by seed: mean +- std, each seed's difference, 2 standard errors,
    and 'beyond' when the mean is more than 2 SE from 0 (the evidence study's rule)."""
    diffs = [mine[metric] - theirs[metric] for mine, theirs in zip(finals[variant], finals["ln/ln"])]
    mean, std = statistics.mean(diffs), statistics.stdev(diffs)
    two_se = 2 * std / len(diffs) ** 0.5
    return (f"{mean:+.3f} ± {std:.3f} ({', '.join(f'{d:+.2f}' for d in diffs)}; 2 SE {two_se:.3f}): "
            + ("beyond" if abs(mean) > two_se else "inside"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "flow-t"))
    parser.add_argument("--collect-only", action="store_true")
    options = parser.parse_args(argv)
    if not options.collect_only:
        tasks = [(v, s) for s in SEEDS for v in VARIANTS]
        # a fresh process per run: a worker that ran one already holds its patched functions
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:
            for future in [pool.submit(one_run, v, s, options.runs) for v, s in tasks]:
                future.result()
    print(collect(options.runs))


if __name__ == "__main__":
    main()
