"""Mutation check of the test suite: does it notice one-line bugs in how sail.py is wired?

Each mutant changes ONE line of sail.py (or of plumbing.py, where named): `original` must occur
exactly once in that file (a stale
mutant, whose line moved or changed, fails loudly instead of silently testing nothing). For each
mutant the repository is copied to a temporary folder, the line is changed there, and
`python -m pytest -x -q -p no:cacheprovider` (test_sail.py and tests/) runs on the copy. A mutant
is caught when a test fails on an assertion (or the suite hangs). A mutant whose first failure is
a NameError, ImportError, SyntaxError or UnboundLocalError, in the test process or in a sail.py it
started, does not run at all: it is reported as `broken`, never as caught, and the check fails
until it is mended. The tests of the wiring block at the end of test_sail.py run first, so a
caught mutant usually costs ~40 s instead of a whole suite (the verdict is the same: the whole
suite still runs when nothing fails).

    python mutants.py                         # every mutant, one after another (~20-40 min)
    python mutants.py --only ref-not-refreshed --only eval-noise-per-stage
    python mutants.py --list                  # names and the lines they change
    python mutants.py -k "wired or ranked"    # passed on to pytest: a subset of the tests
    python mutants.py --baseline              # first run the unmutated suite; tests that fail
                                              # there are left out of every mutant's verdict
    python mutants.py --deselect test_sail.py::test_x   # leave a known-failing test out
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BANNER = "# Wiring: what each step of a whole run is given"

# (name, the text of sail.py that changes -- unique --, what it becomes). Issue 18's classes first.
MUTANTS = [
    # 1. the DPO reference of an iteration is not the model the iteration started from
    ("ref-not-refreshed", "ref_unet = begin_round(pipe, args, stage)",
     "ref_unet = begin_round(pipe, args, stage, base_unet)"),
    # 2. --reward-ref prev takes the wrong stage (the current model: every prompt ties)
    ("reward-ref-prev-wrong-stage", 'saved_model(run.out, f"iter_{i - 1}", unet), args.reward_precision)',
     'saved_model(run.out, f"iter_{i}", unet), args.reward_precision)'),
    ("reward-ref-prev-never-used", 'args.reward_ref == "base" or i == 0:',
     'args.reward_ref == "base" or i < 2:'),
    ("reward-ref-meanings-swapped", 'args.reward_ref == "base" or i == 0:',
     'args.reward_ref == "prev" or i == 0:'),
    # 3. every iteration reuses the same prompts / takes the wrong slice
    ("same-prompts-every-iteration", "new_prompts = prompts[first:i * per_iter]",
     "new_prompts = prompts[0:per_iter]"),
    ("prompt-slice-shifted", "first = (i - 1) * per_iter", "first = i * per_iter"),
    # 4. candidates drawn, or judged, by another model than the current one
    ("candidates-drawn-by-judge-ref",
     "latents = generate(pipe, prompts, n, args, [seeded(*key) for key in keys])",
     "latents = generate(type(pipe)(**{**pipe.components, 'unet': judge_ref}), "
     "prompts, n, args, [seeded(*key) for key in keys])"),
    ("eq8-theta-and-ref-swapped", "rewards = implicit_reward(denoiser(pipe), judge_ref, candidates,",
     "rewards = implicit_reward(judge_ref, denoiser(pipe), candidates,"),
    ("candidates-sampled-with-ddpm", "    set_sampler(pipe, args)", "    pass"),
    # 5. winner and loser conditioned differently (each loser gets another pair's prompt)
    ("loser-conditioned-on-another-prompt", "cond = map_cond(lambda v: torch.cat([v, v]), cond)",
     "cond = map_cond(lambda v: torch.cat([v, v.roll(1, 0)]), cond)"),
    ("cfg-dropout-ignored",
     'prompts = ["" if drop else pair["prompt"] for drop, pair in zip(dropped, batch)]',
     'prompts = [pair["prompt"] for pair in batch]'),
    # 6. winner and loser share their VAE posterior noise
    ("shared-posterior-noise", "posterior_noise[:, images].flatten(0, 1))",
     "posterior_noise[0, images].repeat(2, 1, 1, 1))"),
    # 7. pairs.json or the saved pair images say the opposite of what Eq. 8 ranked / what trains
    ("pair-pngs-swapped", 'zip(("chosen", "rejected"), latents, images, noises):',
     'zip(("chosen", "rejected"), latents, images.flip(0), noises):'),
    ("pair-latents-swapped", 'zip(("chosen", "rejected"), latents, images, noises):',
     'zip(("chosen", "rejected"), latents.flip(0), images, noises):'),
    ("pair-images-swapped-vs-rewards", "pair = candidates[list(chosen)]",
     "pair = candidates[list(chosen)[::-1]]"),
    ("pairs-json-rewards-swapped", '"reward_chosen": r_w, "reward_rejected": r_l,',
     '"reward_chosen": r_l, "reward_rejected": r_w,'),
    ("pairs-json-flipped", 'run.write_json(folder / "pairs.json", [',
     'run.write_json(folder / "pairs.json", [{**q, "chosen": q["rejected"], '
     '"rejected": q["chosen"]} for q in self_pairs] or [', "plumbing.py"),
    ("confidence-inverted", "preference_probability(r_w, r_l).item(),",
     "preference_probability(r_l, r_w).item(),"),
    ("pair-prompts-rotated", "zip(prompts[start:done], run.gather(found))",
     "zip(prompts[start + 1:done] + prompts[start:start + 1], run.gather(found))"),
    # 8. the evaluation noise differs from stage to stage
    ("eval-noise-per-stage", 'seeded(args.seed, "evaluation", i)',
     'seeded(args.seed, "evaluation", folder.name, i)'),
    # 9. gradient clipping is gone; gradients never zeroed
    ("no-gradient-clipping", "torch.nn.utils.clip_grad_norm_(denoiser(pipe).parameters(), 1.0)", "pass"),
    ("gradients-never-zeroed", "optimizer.zero_grad(set_to_none=True)", "pass"),
    # 10. the reference errors come from the trained UNet (every logit 0, loss stuck at ln 2)
    ("ref-errors-from-theta", "err_ref = denoising_error(ref_unet, scheduler, x0, *shared, cond)",
     "err_ref = denoising_error(model, scheduler, x0, *shared, cond)"),
    ("optimizer-on-the-reference", "optimizer = make_optimizer(list(trained.values()), args)",
     "optimizer = make_optimizer(list(ref_unet.parameters()), args)"),
    ("ref-errors-winner-loser-swapped", "*err_theta.chunk(2), *err_ref.chunk(2), beta)",
     "*err_theta.chunk(2), *err_ref.chunk(2)[::-1], beta)"),
    # 11. seed-pair latents lose the VAE scaling factor
    ("latents-unscaled", "return (x0 - (vae.config.shift_factor or 0)) * vae.config.scaling_factor",
     "return x0 - (vae.config.shift_factor or 0)"),
    # 12. winners and losers stacked pair by pair while the loss splits the batch into halves
    ("pairs-stacked-pair-by-pair", "return x0.flatten(0, 1)  ",
     "return x0.transpose(0, 1).flatten(0, 1)  "),
    # 13. a prompt's candidates judged under another prompt's conditioning, or another's candidates
    ("judged-under-first-prompt", "map_cond(lambda v: v[p:p + 1], cond), scheduler,",
     "map_cond(lambda v: v[0:1], cond), scheduler,"),
    ("candidates-of-overlapping-prompts", "candidates = latents[p * n:(p + 1) * n]",
     "candidates = latents[p:p + n]"),
    # 14. ranked mixup orders by the winner's reward instead of the margin
    ("mixup-ranks-by-winner-reward",
     'key=lambda p: p["reward_chosen"] - p["reward_rejected"],', 'key=lambda p: p["reward_chosen"],'),
    # 15. a resumed run continues from the first finished stage's model instead of the last
    ("resume-from-first-finished", "saved_model(run.out, finished[-1], denoiser(pipe))",
     "saved_model(run.out, finished[0], denoiser(pipe))", "plumbing.py"),
    # other wiring: the iteration trains on seed pairs only (self-labelling has no effect)
    ("iteration-trains-on-seed-pairs", "diffusion_dpo(pipe, ref_unet, mixed, args, stage, run,",
     "diffusion_dpo(pipe, ref_unet, seed_pairs, args, stage, run,"),
    ("k-draws-ignored", "args.beta, args.k_draws, generator, args.reward_batch)",
     "args.beta, 1, generator, args.reward_batch)"),
    ("every-stage-saves-the-base", "save_model(pipe, args, folder, stage)",
     "save_model(type(pipe)(**{**pipe.components, 'unet': judge_base}), args, folder, stage)"),
    ("checkpoint-loaded-into-the-reference", 'unet.load_state_dict({**unet.state_dict(), **checkpoint["unet"]})',
     'ref_unet.load_state_dict({**unet.state_dict(), **checkpoint["unet"]})'),
    # expected to survive: with one micro-batch per step, clip + AdamW are blind to a loss scale
    ("micro-batch-loss-not-averaged", "scaler.scale(loss / len(mine)).backward()",
     "scaler.scale(loss).backward()"),
    # the real path: held-out data, evaluation prompts, warm-up, fp16, the judge
    ("heldout-pairs-also-trained", "return ([pair for i, pair in enumerate(seed_pairs) if i not in held],",
     "return (list(seed_pairs),", "plumbing.py"),
    ("eval-prompts-also-trained", "return [p for p in prompts if p not in held], held[::-1]",
     "return prompts, held[::-1]", "plumbing.py"),
    ("judge-acc-against-the-current-model", "judge_base, run.stages.index(stage) - 1,",
     "judge_base, run.stages.index(stage),"),
    # the held-out judge reads backwards; ignores --reward-ref prev (judges against the base)
    ("heldout-judge-winner-loser-swapped", "r_w, r_l = rewards.chunk(2)  ",
     "r_l, r_w = rewards.chunk(2)  "),
    ("heldout-judge-always-against-the-base",
     "judge_ref = reward_reference(args, run, judge_base, run.stages.index(stage) - 1,",
     "judge_ref = reward_reference(args, run, judge_base, 0,"),
    ("warmup-ignored", "lr = args.lr * min(1.0, (step + 1) / (warmup + 1))", "lr = args.lr"),
    ("fp16-overflow-skipped-not-redone", "if scaler.get_scale() >= scale:  # the step was taken",
     "if True:"),
    ("fp16-scale-not-carried", '"loss_scale", 2.0 ** 16)', '"no such key", 2.0 ** 16)', "plumbing.py"),
    # LoRA: one network, every model SAIL compares with is it with some rounds' adapters on
    ("lora-reference-keeps-adapters-on", "switch_rounds(self.unet, self.rounds)", "pass", "plumbing.py"),
    ("lora-earlier-rounds-switched-off", "switch_rounds(unet, [*earlier, stage])",
     "switch_rounds(unet, [stage])", "plumbing.py"),
    ("lora-base-copied", "return Rounds(unet, []), Rounds(unet, [])",
     "return frozen_copy(unet, args.precision), frozen_copy(unet, args.reward_precision)", "plumbing.py"),
    ("lora-adapters-in-half-precision", "parameter.data = parameter.data.float()", "pass", "plumbing.py"),
    ("lora-judge-computes-in-half-precision", 'if args.reward_precision == "fp32" else [])',
     'if False else [])', "plumbing.py"),
    ("lora-merged-in-half-precision", 'merged = copy.deepcopy(unet.to("cpu")).float()',
     'merged = copy.deepcopy(unet.to("cpu"))', "plumbing.py"),
    ("lora-trains-every-weight", "if not args.lora_rank:  # LoRA: only the adapters",
     "if True:  # LoRA: only the adapters"),
    ("lora-init-from-the-global-rng", 'torch.manual_seed(seeded(args.seed, stage, "lora").initial_seed())',
     "pass", "plumbing.py"),
    ("lora-alpha-ignored", "lora_alpha=args.lora_alpha or args.lora_rank,", "lora_alpha=args.lora_rank,",
     "plumbing.py"),
    ("lora-default-alpha-one", "lora_alpha=args.lora_alpha or args.lora_rank,",
     "lora_alpha=args.lora_alpha or 1,", "plumbing.py"),
    ("lora-resume-loads-only-the-last-round", "    for stage in stages:",
     "    for stage in stages[-1:]:", "plumbing.py"),
    ("lora-reward-ref-prev-is-the-current-model", 'return Rounds(unet, [f"iter_{j}" for j in range(i)])',
     "return unet"),
    # --pair-noise prior (PNAPO): each self-labelled image on the noise it was sampled from
    ("prior-noise-of-the-other-image", "noises[p * n:(p + 1) * n][list(chosen)].cpu()))",
     "noises[p * n:(p + 1) * n][list(chosen)[::-1]].cpu()))"),
    ("prior-noise-not-saved", 'pair[f"{key}_noise"] = name + "_noise.pt"', "pass"),
    ("prior-noise-ignored-in-training",
     'eps[side * len(batch) + i] = torch.load(pair[f"{key}_noise"], weights_only=True)', "pass"),
    ("prior-noise-winner-loser-swapped", 'for side, key in enumerate(("chosen", "rejected")):',
     'for side, key in enumerate(("rejected", "chosen")):'),
    ("relabel-leaves-the-noise", 'for end in ("", "_latents", "_noise"):', 'for end in ("", "_latents"):',
     "tiny_world.py"),
    ("checkpoint-not-restored", 'unet.load_state_dict({**unet.state_dict(), **checkpoint["unet"]})',
     "pass"),
    # issue 29's faster paths: the kept posteriors, the reference in its own precision
    ("posteriors-never-kept", "if not all(path in self.chunk_of for path in paths):", "if True:",
     "plumbing.py"),
    ("reference-under-autocast", "with torch.no_grad(), own_dtype(ref_unet):", "with torch.no_grad():"),
    ("reference-timestep-cast", 'floating = torch.is_tensor(value) and value.is_floating_point() and name != "timestep"',
     "floating = torch.is_tensor(value) and value.is_floating_point()", "plumbing.py"),
    ("mixed-reference-cast", "if len(dtypes) != 1 or dtypes == {torch.float32}:",
     "if dtypes == {torch.float32}:", "plumbing.py"),
    # flow-matching models: Eq. RF, the time the model is told, FLUX's packing
    ("flow-noising-ends-swapped", "return (1 - sigma) * x0 + sigma * noise",
     "return sigma * x0 + (1 - sigma) * noise"),
    ("flow-velocity-sign-flipped", "return noise - x0", "return x0 - noise"),
    ("timesteps-never-the-last", "return torch.randint(0, scheduler.config.num_train_timesteps, (n,),",
     "return torch.randint(0, scheduler.config.num_train_timesteps - 1, (n,),"),
    ("flow-model-told-the-index", "return scheduler.timesteps.to(t.device)[t] if is_flow(scheduler) else t",
     "return t"),
    ("flux-time-not-divided", "out = unet(tokens, timestep=t / 1000, img_ids=image_ids,",
     "out = unet(tokens, timestep=t, img_ids=image_ids,"),
    ("flux-guidance-not-the-sampling-one",
     'cond["guidance"] = torch.full((len(prompts),), args.guidance_scale, device=pipe.device)',
     'cond["guidance"] = torch.full((len(prompts),), 1.0, device=pipe.device)'),
    ("flux-latents-left-packed", "if isinstance(pipe, FluxPipeline):  # FLUX hands back", "if False:  #"),
    ("vae-shift-ignored-on-decode",
     "latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)",
     "latents = latents / vae.config.scaling_factor"),
    ("vae-shift-ignored-on-encode",
     "return (x0 - (vae.config.shift_factor or 0)) * vae.config.scaling_factor",
     "return x0 * vae.config.scaling_factor"),
    ("flow-trains-on-a-ddpm-schedule",
     "kind = FlowMatchEulerDiscreteScheduler if is_flow(pipe.scheduler) else DDPMScheduler",
     "kind = DDPMScheduler"),
]


def apply(source, original, replacement, name, file="sail.py"):
    """The file's text with the one change; refuses anything but exactly one occurrence."""
    count = source.count(original)
    if count != 1:
        raise SystemExit(f"mutant {name}: {original!r} occurs {count} times in {file} (must be "
                         "exactly once): re-anchor it")
    if "\n" in original or "\n" in replacement:
        raise SystemExit(f"mutant {name}: a mutant changes one line")
    return source.replace(original, replacement)


def copy_repository(into, source=HERE):
    shutil.copytree(source, into, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".pytest_cache", "runs", "results"))


def wiring_first(folder):
    """Node ids of the whole suite, test_sail.py's wiring block first, then the rest in order."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider"],
                            cwd=folder, capture_output=True, text=True, env=environment())
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    if not ids:
        raise SystemExit("could not collect the suite:\n" + result.stdout + result.stderr)
    text = (folder / "test_sail.py").read_text()
    block = text[text.index(BANNER):] if BANNER in text else ""
    wiring = set(re.findall(r"^def (test_\w+)", block, flags=re.M))
    wired = lambda node: (node.startswith("test_sail.py::")  # noqa: E731
                          and node.split("::")[1].split("[")[0] in wiring)
    return [n for n in ids if wired(n)] + [n for n in ids if not wired(n)]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# A mutant that does not even run: its first failure is one of these, not a failed assertion.
BROKEN = re.compile(r"\b(NameError|ImportError|ModuleNotFoundError|SyntaxError|UnboundLocalError)\b")


# Tests that any edit of sail.py fails whatever it changes: left out of every verdict.
EDIT_DETECTORS = ["tests/test_page.py::test_page_is_current_with_sail_py"]  # the page is sail.py's


def run_suite(folder, node_ids, keyword, timeout, deselect=(), stop_at_first=True):
    """(verdict, failing tests, seconds); verdict 'missed' when every selected test passes,
    'broken' when the first failure is the mutant not running (BROKEN) rather than an assertion."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short"]
    command += ["-x"] if stop_at_first else []
    command += ["-k", keyword] if keyword else []
    if node_ids:
        command += [node for node in node_ids if node not in deselect]
    else:
        command += [f"--deselect={node}" for node in deselect]
    started = time.time()
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                                timeout=timeout, env=environment())
    except subprocess.TimeoutExpired:
        return "caught (timeout)", [f"over {timeout} s"], time.time() - started
    seconds = time.time() - started
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
    if result.returncode == 0:
        return "missed", [], seconds
    if result.returncode == 5:  # -k selected nothing
        return "missed", ["(no test selected)"], seconds
    broken = BROKEN.search(result.stdout)
    if broken:  # the traceback (or a subprocess's stderr inside it) names why the code never ran
        return "broken", [f"{broken.group(1)}: {(failed or ['?'])[0]}"], seconds
    return "caught", failed or [result.stdout[-300:].strip()], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutant (repeatable)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression: a subset of the tests")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the unmutated suite; the tests failing there are left out")
    parser.add_argument("--file-order", action="store_true",
                        help="run the tests in file order instead of the wiring block first")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODE",
                        help="leave this test out of every verdict (repeatable)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [(*m, "sail.py")[:4] for m in MUTANTS]  # (name, original, replacement, file)
    sources = {file: (HERE / file).read_text() for *_, file in chosen}
    names = [m[0] for m in chosen]
    unknown = [name for name in args.only if name not in names]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
    chosen = [m for m in chosen if not args.only or m[0] in args.only]
    for name, original, replacement, file in chosen:  # every anchor checked before any work
        apply(sources[file], original, replacement, name, file)
    if args.list:
        for name, original, replacement, file in chosen:
            print(f"{name} ({file})\n    - {original}\n    + {replacement}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="sail-mutants-") as scratch:
        pristine = Path(scratch) / "pristine"
        copy_repository(pristine)
        node_ids = None if args.file_order else wiring_first(pristine)
        deselect = list(args.deselect) + EDIT_DETECTORS
        if args.baseline:  # the whole suite, not stopping at a failure
            verdict, failed, seconds = run_suite(pristine, node_ids, args.keyword, args.timeout,
                                                 deselect, stop_at_first=False)
            print(f"baseline ({seconds:.0f} s): " + ("passes" if verdict == "missed" else
                  "fails, left out of every verdict: " + " ".join(failed)), flush=True)
            deselect += [node for node in failed if "::" in node]
        for name, original, replacement, file in chosen:
            folder = Path(scratch) / name
            copy_repository(folder, pristine)  # edits made while it runs do not leak in
            (folder / file).write_text(apply(sources[file], original, replacement, name, file))
            verdict, failed, seconds = run_suite(folder, node_ids, args.keyword, args.timeout,
                                                 deselect)
            first = failed[0] if failed else ""
            results.append((name, verdict, first))
            print(f"{verdict:8} {name:36} {seconds:5.0f} s  {first}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    caught = sum(verdict.startswith("caught") for _, verdict, _ in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    missed = [name for name, verdict, _ in results if verdict == "missed"]
    broken = [name for name, verdict, _ in results if verdict == "broken"]
    if missed:
        print("missed: " + ", ".join(missed))
    if broken:
        print("broken (the mutated code does not run; mend the mutant): " + ", ".join(broken))
    return 0 if not (missed or broken) else 1


if __name__ == "__main__":
    sys.exit(main())
