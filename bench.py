"""Benchmark: where one SAIL iteration's time and memory go, and how each stage scales.

A SAIL iteration is generation (N images per prompt, `steps` denoising passes each, twice for
CFG) + ranking (N x K noisy latents through two UNets, Eq. 8) + Diffusion-DPO training (per pair:
theta forward + backward on winner and loser, ref forward on both). This measures each, in one run:

    python bench.py               # the tiny world on CPU (about 1.5 minutes on 2 cores)
    python bench.py --quick       # the smallest size (the test suite runs it)
    python bench.py --sd15-shaped # Stable Diffusion 1.5's architecture, random weights, 512 px:
                                  # real-scale figures on a GPU without downloading weights
    python bench.py --memory      # SD 1.5-shaped, 512 px: peak memory of a DPO step per
                                  # --precision / --gradient-checkpointing / --optimizer option
    python bench.py --gpu-figures # one GPU, < 8 min: a whole sail.py --iters 1 per precision,
                                  # stage by stage; official Diffusion-DPO step vs sail.py's;
                                  # Eq. 8's rounding spread per precision; an SDXL DPO step
    python bench.py --gpu-figures --toy   # the same code paths at toy sizes on a CPU (the test)

Every figure is the median of several repeats after a warm-up. Peak memory is the process's peak
resident set (VmHWM, reset before each measurement) on CPU, torch.cuda.max_memory_allocated on a
GPU. Writes <out> (default runs/bench-<time>): results.md, results.csv and scaling.png (needs
matplotlib).
"""

import argparse
import contextlib
import copy
import csv
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built here: a lookup would only hang

import diffusers.optimization  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import (AutoencoderKL, FluxTransformer2DModel, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                          T5Config, T5EncoderModel, T5Tokenizer)

import plumbing  # noqa: E402
import sail  # noqa: E402
import tiny_world  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn, repeats, device):
    """Median seconds of fn() over `repeats` runs after one warm-up, and the peak memory in MB."""
    fn()
    reset_peak_memory(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), peak_memory_mb(device), result


def measured_row(figures, work, repeats, row, **measured):
    """A figures row of `work` (measure: median seconds, peak memory) with `row`'s fields and the
    `measured` ones (units, unit, note), or, when the GPU ran out, `row` alone with status OOM."""
    try:
        seconds, peak, _ = measure(work, repeats, figures.device)
        figures.add(**row, **measured, seconds=seconds, peak_gib=peak / 1024)
    except torch.OutOfMemoryError:
        figures.add(**row, status="OOM")


def lora_round(pipe, args, pairs, run):
    """A LoRA round begun as sail.py begins it (the denoiser's own weights frozen in --precision,
    gradient checkpointing, fresh fp32 adapters) -> (its DPO stage as a function that can run
    again, the adapters' weight count): a stage ends by freezing its adapters, so each call makes
    them trainable again. Without peft: sail's InputError naming it."""
    plumbing.peft()
    model = plumbing.denoiser(pipe)
    sail.cast_frozen_models(pipe, args.precision, lora=True)  # as sail.main does
    model.enable_gradient_checkpointing()
    ref = sail.begin_round(pipe, args, "iter_0")  # the network with the round's adapters off
    trained = [p for p in model.parameters() if p.requires_grad]

    def stage():
        for parameter in trained:
            parameter.requires_grad_(True)
        return sail.diffusion_dpo(pipe, ref, pairs, args, "iter_0", run)
    return stage, sum(p.numel() for p in trained)


# ------------------------------------------------------------------------------------------------
# The pieces of one iteration, each a function of its size
# ------------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, pipe, args, seed_pairs, scratch):
        self.pipe, self.args, self.seed_pairs, self.scratch = pipe, args, seed_pairs, scratch
        self.device = pipe.device
        sail.cast_frozen_models(pipe, args.precision)  # as sail.py's main does
        self.scheduler = sail.DDPMScheduler.from_config(pipe.scheduler.config)
        # pipe.unet plays theta everywhere (a trained theta would cost the same); one frozen copy
        # is the reference: the benchmark holds no more UNets than a run does
        self.theta, self.ref = pipe.unet, sail.frozen_copy(pipe.unet, args.precision)
        self.autocast = lambda: sail.autocast(self.device, args.precision)  # noqa: E731
        self.cond = sail.encode_text(pipe, ["a red circle"], args)  # (1, L, D)

    def generation(self, n_prompts, n):
        generator = torch.Generator().manual_seed(0)
        return lambda: sail.generate(self.pipe, ["a red circle"] * n_prompts, n, self.args,
                                     generator)

    def latents(self, n, size=None, seed=0):
        size = size or self.args.resolution // self.pipe.vae_scale_factor
        return torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed)).to(
            self.device)

    def ranking(self, n, k, batched=True):
        """Eq. 8 for one prompt's n candidates: batched as in sail.py, or a plain double loop."""
        x = self.latents(n)
        if batched:
            def batched_reward():
                with self.autocast():
                    return sail.implicit_reward(self.theta, self.ref, x, self.cond, self.scheduler,
                                                self.args.beta, k, torch.Generator().manual_seed(1))
            return batched_reward
        return lambda: self.ranking_loop(x, k)

    def ranking_loop(self, x, k):
        """The same numbers as implicit_reward, one candidate and one draw at a time."""
        generator = torch.Generator().manual_seed(1)  # the same K draws in the same order
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (k,), generator=generator)
        noise = torch.randn((k, *x.shape[1:]), generator=generator).to(self.device)
        rewards = []
        with torch.no_grad(), self.autocast():
            for n in range(x.shape[0]):
                diffs = [sail.denoising_error(self.theta, self.scheduler, x[n:n + 1],
                                              noise[j:j + 1], t[j:j + 1].to(self.device), self.cond)
                         - sail.denoising_error(self.ref, self.scheduler, x[n:n + 1],
                                                noise[j:j + 1], t[j:j + 1].to(self.device),
                                                self.cond)
                         for j in range(k)]
                rewards.append(-(self.args.beta / 2) * torch.cat(diffs).mean())
        return torch.stack(rewards)

    def dpo_step(self, batch, size=None, concatenated=True):
        """One Diffusion-DPO forward + backward on `batch` pairs of latents (no optimizer step);
        returns the errors, so the two ways of batching can be checked to compute the same."""
        unet = self.theta
        x_w, x_l = self.latents(batch, size, seed=0), self.latents(batch, size, seed=1)
        noise = self.latents(batch, size, seed=3)  # shared by winner and loser (Eq. DPO)
        t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2)).to(
            self.device)
        cond = sail.map_cond(lambda v: v.expand(batch, *v.shape[1:]), self.cond)
        twice = lambda v: torch.cat([v, v])  # noqa: E731

        def error(model, x0, noise, t, cond):
            with self.autocast():
                return sail.denoising_error(model, self.scheduler, x0, noise, t, cond)

        def step():
            unet.train().requires_grad_(True)
            unet.zero_grad(set_to_none=True)
            if concatenated:  # sail.py: one forward per model on (winners, losers)
                shared = (twice(noise), twice(t), sail.map_cond(twice, cond))
                err_theta = error(unet, torch.cat([x_w, x_l]), *shared).chunk(2)
                with torch.no_grad():
                    err_ref = error(self.ref, torch.cat([x_w, x_l]), *shared).chunk(2)
            else:  # separate forwards for winners and losers
                err_theta = [error(unet, x, noise, t, cond) for x in (x_w, x_l)]
                with torch.no_grad():
                    err_ref = [error(self.ref, x, noise, t, cond) for x in (x_w, x_l)]
            loss, _ = sail.dpo_loss(*err_theta, *err_ref, self.args.beta)
            loss.backward()
            unet.zero_grad(set_to_none=True)
            unet.eval().requires_grad_(False)
            return torch.cat([*err_theta, *err_ref]).detach()  # the four (B,) errors of Eq. DPO
        return step

    def dpo_stage(self, steps):
        """sail.py's own diffusion_dpo for `steps` optimizer steps (image loading, VAE included).
        It trains pipe.unet in place: the timings after it do not depend on its weights."""
        args = copy.copy(self.args)
        args.dpo_steps, args.checkpoint_every = steps, steps + 1  # no checkpoint: not a DPO cost
        run = sail.Run(self.scratch, args)  # its metrics.jsonl goes to a temporary folder
        run.open_log()
        return lambda: sail.diffusion_dpo(self.pipe, self.ref, self.seed_pairs, args, "iter_0", run)


def posterior_cache_gain(device, resolution, pairs, out, quick):
    """--cache-gain: one Diffusion-DPO step of `pairs` pairs (sail.diffusion_dpo, the default
    precision) on the SD 1.5 shape (--quick: the tiny base), with the VAE encoding the seed
    pairs' images in the step (--no-cache-posteriors) and with their posteriors kept
    (--cache-posteriors: the step only draws x_0), PNGs decoded ahead in both; median of 2 steps
    after one. The same step otherwise: the gain is the VAE's share of a step."""
    seed_pairs = plumbing.read_seed_pairs(Path(__file__).parent / "seed_pairs.json")[:pairs]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        pipe = (plumbing.load_pipeline(str(tiny_world.BASE), device) if quick else
                plumbing.prepare_pipeline(sd15_shaped_pipeline(scratch), device))
        args = sail.Args(resolution=resolution, precision=plumbing.default_precision(),
                         effective_batch=pairs, micro_batch=pairs, dpo_steps=1, lr=1e-6,
                         checkpoint_every=2)
        sail.cast_frozen_models(pipe, args.precision)
        reference = sail.begin_round(pipe, args, "iter_0")
        with patched(plumbing, load_image=cached_image_loader(seed_pairs, resolution)):
            for kept in (False, True):
                run = sail.Run(scratch / f"kept-{kept}", args)
                run.out.mkdir()
                run.open_log()
                if kept:  # as sail.start_run keeps them, filled before the timed steps
                    run.posteriors = plumbing.kept_posteriors(pipe.vae, seed_pairs, args)
                    run.posteriors(list(run.posteriors.chunk_of))
                seconds, peak, _ = measure(lambda: sail.diffusion_dpo(
                    pipe, reference, seed_pairs, args, "iter_0", run), 2, device)
                run.log_file.close()
                rows.append((kept, seconds, peak))
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads, peak resident memory")
    lines = [f"Machine: {machine}; torch {torch.__version__}; "
             f"{'the tiny base' if quick else 'SD 1.5-shaped, random weights'}, {resolution} px, "
             f"{args.precision}; one DPO step of {pairs} pairs (sail.diffusion_dpo), PNGs decoded "
             "ahead; median of 2 steps after one.", "",
             "| seed pairs' VAE posteriors | s/step | pairs/s | peak MB |", "|---|---|---|---|"]
    lines += [f"| {'kept (--cache-posteriors)' if kept else 'encoded in the step'} | {seconds:.3f} | "
              f"{pairs / seconds:.3g} | {peak:.0f} |" for kept, seconds, peak in rows]
    lines += ["", f"Kept: {rows[0][1] / rows[1][1]:.2f}x the pairs/s of encoding in the step."]
    out.mkdir(parents=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print((out / "results.md").read_text())
    return 0


def clip_text_config(tokenizer, **sizes):
    """CLIP ViT-L/14's text encoder (SD 1.5's, SDXL's first), `sizes` overriding its config."""
    return CLIPTextConfig(**{
        **dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id), **sizes})


def sd_vae(scaling_factor=0.18215):
    """SD's VAE (SDXL's has the same shape and another scaling factor)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        sample_size=512, scaling_factor=scaling_factor)


def sd_scheduler():
    return sail.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)


def sd15_shaped_pipeline(folder):
    """Stable Diffusion 1.5's architecture (UNet 860M, CLIP ViT-L/14 text encoder, VAE) with random
    weights, from configs: timings and memory at real scale need no downloaded weights."""
    tokenizer = tiny_world.tokenizer(folder)  # a few ids of the vocabulary: cost does not depend on them
    tokenizer.model_max_length = 77
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.x blocks
    return StableDiffusionPipeline(
        vae=sd_vae(), text_encoder=CLIPTextModel(clip_text_config(tokenizer)),
        tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


# ------------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------------

def run(bench, quick, rows, latent_sizes):
    args, device = bench.args, bench.device
    repeats = 2 if quick else 5
    prompts = 2 if quick else args.prompts_per_iter or 4
    n, k = (2, 2) if quick else (args.n_candidates, args.k_draws)

    def record(measure_name, setting, value, units, unit_name, fn, reps=repeats):
        seconds, memory, result = measure(fn, reps, device)
        rows.append({"measure": measure_name, "setting": setting, "value": value,
                     "seconds": seconds, "per_second": units / seconds, "unit": unit_name,
                     "peak_mb": memory})
        print(f"{measure_name:<22} {setting:<10} {value!s:<6} {seconds * 1000:9.1f} ms  "
              f"{units / seconds:9.1f} {unit_name}/s  peak {memory:7.0f} MB", flush=True)
        return result

    # 1. One iteration's stages at the run's own settings
    record("stage: generation", "prompts", prompts, prompts * n, "images",
           bench.generation(prompts, n))
    record("stage: ranking", "prompts", prompts, prompts * n, "images",
           lambda: [bench.ranking(n, k)() for _ in range(prompts)])
    steps = 1 if quick or not args.tiny else 5
    record("stage: DPO", "steps", steps, steps * args.effective_batch, "pairs",
           bench.dpo_stage(steps), reps=1 if quick or not args.tiny else 3)

    # 2. Batched implicit reward vs a loop over candidates and draws: same numbers, the ratio
    batched = record("reward: batched", "N x K", f"{n}x{k}", n, "images", bench.ranking(n, k))
    looped = record("reward: loop", "N x K", f"{n}x{k}", n, "images", bench.ranking(n, k, False))
    torch.testing.assert_close(batched, looped, rtol=1e-3, atol=1e-3)

    # 3. DPO: one forward per model on the concatenated batch vs separate forwards
    batch = 4 if quick else args.micro_batch
    together = record("dpo: concatenated", "batch", batch, batch, "pairs", bench.dpo_step(batch))
    apart = record("dpo: separate", "batch", batch, batch, "pairs",
                   bench.dpo_step(batch, concatenated=False))
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-6)  # the same errors

    # 4. Scaling with N, K, latent size and batch
    for value in ((2, 4) if quick else (2, 4, 8, 16)):
        record("scaling: generation", "N", value, value, "images", bench.generation(1, value))
        record("scaling: ranking", "N", value, value, "images", bench.ranking(value, k))
    for value in ((1, 2) if quick else (1, 5, 10, 20)):
        record("scaling: ranking", "K", value, n, "images", bench.ranking(n, value))
    for value in latent_sizes[:1] if quick else latent_sizes:
        record("scaling: dpo", "latent", value, batch, "pairs", bench.dpo_step(batch, value))
    for value in ((2, 4) if quick else (4, 8, 16, 32)):
        record("scaling: dpo", "batch", value, value, "pairs", bench.dpo_step(value))


# The memory options of sail.py, each measured alone:
# (precision, gradient checkpointing, optimizer, LoRA rank; 0 = full fine-tuning)
MEMORY_OPTIONS = [("fp32", False, "adamw", 0), ("fp32", True, "adamw", 0), ("bf16", False, "adamw", 0),
                  ("bf16", True, "adamw", 0), ("bf16", True, "adafactor", 0),
                  ("fp32", False, "adamw", 8), ("bf16", False, "adamw", 8), ("bf16", True, "adamw", 8)]


def memory(device, pairs, resolution, out):
    """Peak memory of one Diffusion-DPO step of SD 1.5-shaped models, per memory option.

    The whole training stage as sail.py holds it: theta (fp32) with its gradients and optimizer
    state, the frozen reference UNet, VAE and text encoder in --precision, activations of a
    micro-batch of `pairs` pairs; with LoRA, the UNet's own weights frozen in --precision, the
    fp32 adapters' gradients and optimizer state and no reference UNet (sail.begin_round).
    Fresh models for every option.
    """
    seed_pairs = plumbing.read_seed_pairs(Path(__file__).parent / "seed_pairs.json")
    rows = []
    for precision, checkpointing, optimizer, lora_rank in MEMORY_OPTIONS:
        with tempfile.TemporaryDirectory() as scratch:
            pipe = plumbing.prepare_pipeline(sd15_shaped_pipeline(Path(scratch)), device)
            args = sail.Args(resolution=resolution, precision=precision, optimizer=optimizer,
                             gradient_checkpointing=checkpointing, effective_batch=pairs,
                             micro_batch=pairs, dpo_steps=1, lr=1e-6, checkpoint_every=2,
                             lora_rank=lora_rank)
            sail.cast_frozen_models(pipe, precision, lora=bool(lora_rank))  # as sail.main does
            if checkpointing:
                pipe.unet.enable_gradient_checkpointing()
            ref = sail.begin_round(pipe, args, "iter_0")  # a frozen copy, or LoRA's adapters off
            run = sail.Run(scratch, args)
            run.open_log()
            reset_peak_memory(device)
            started = time.perf_counter()
            sail.diffusion_dpo(pipe, ref, seed_pairs, args, "iter_0", run)
            seconds = time.perf_counter() - started
            row = {"precision": precision, "gradient_checkpointing": checkpointing,
                   "optimizer": optimizer, "lora_rank": lora_rank, "pairs": pairs, "seconds": seconds,
                   "peak_gib": peak_memory_mb(device) / 1024}
            run.log_file.close()
            del pipe, ref, run
            gc.collect()  # the next option starts from the same resident memory
        rows.append(row)
        print(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items()), flush=True)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads, peak resident memory")
    lines = [f"Machine: {machine}; torch {torch.__version__}; SD 1.5-shaped, random weights, "
             f"{resolution} px; one DPO step of {pairs} pair(s).", "",
             "| precision | gradient checkpointing | optimizer | LoRA rank | peak GiB | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
              f"{r['optimizer']} | {r['lora_rank'] or 'full'} | {r['peak_gib']:.1f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    out.mkdir(parents=True)
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    with open(out / "memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print((out / "memory.md").read_text())


# ------------------------------------------------------------------------------------------------
# --gpu-figures: the README's GPU figures in one short session on one GPU
# ------------------------------------------------------------------------------------------------
# One process, at most 8 minutes with model construction, SD 1.5-, SDXL- and FLUX.1-shaped random
# weights (no downloads):
#   part 1  a whole `sail.py --iters 1` per --precision, run in-process through sail.main with
#           sail's stage functions wrapped to time them and record each one's peak memory;
#   part 2  a Diffusion-DPO step as the official train.py computes it, against sail.py's step;
#   part 3  Eq. 8's rounding spread at theta == ref per precision, against a real spread;
#   part 4  an SDXL-shaped DPO step at 1024 px with the SDXL preset (Adafactor), then with LoRA
#           (rank 8, the UNet's own weights in bf16, gradient checkpointing: docs/lora.md);
#   part 5  a FLUX.1-shaped LoRA stage's peaks: a DPO step, generation, Eq. 8 (docs/lora.md).
# Every row is printed and saved (results.csv, results.md) as it completes, so a run cut short
# keeps what it measured; an out-of-memory error is a row, not the end of the run.

# The counts each part uses; --sizes key=value,... overrides any of them. GPU: the paper's
# per-sample settings (N = 8, K = 10, DDPM 50 steps, CFG 7.5) at counts that fit 8 minutes.
GPU_SIZES = dict(resolution=512, sdxl_resolution=1024, n_candidates=8, k_draws=10,
                 sample_steps=50, guidance_scale=7.5, prompts_per_iter=1, seed_pairs=8,
                 effective_batch=4, micro_batch=2, dpo_steps=2, eval_seeds=1, dpo_pairs=8,
                 spread_prompts=3, spread_dpo_steps=2, sdxl_pairs=1, repeats=3,
                 flux_resolution=1024, flux_sample_steps=4, flux_reward_batch=4, rate_steps=10,
                 rate_calls="8,32,64")
# --toy: the same code paths at tiny sizes and tiny models, on a CPU in seconds (the test runs it)
TOY_SIZES = dict(GPU_SIZES, resolution=16, sdxl_resolution=16, n_candidates=3, k_draws=2,
                 sample_steps=2, seed_pairs=4, effective_batch=2, micro_batch=1, dpo_steps=1,
                 dpo_pairs=2, spread_prompts=2, spread_dpo_steps=1, repeats=1,
                 flux_resolution=16, flux_sample_steps=2, flux_reward_batch=2, rate_steps=2,
                 rate_calls="3,6")
# Seconds each piece is expected to take on an H100 (GPU_RUN estimate), to skip what cannot
# finish inside --budget-s: part 1 per precision, then parts 2, 3, 4
EXPECTED_SECONDS = {"fp32": 110, "bf16": 35, "fp16": 35, 2: 40, 3: 60, 4: 55, 5: 120, 6: 240}
FIGURE_PROMPTS = ["a red circle", "a green square", "a blue triangle", "a yellow circle",
                  "a cyan square", "a magenta triangle"]
FIGURE_FIELDS = ["part", "measure", "precision", "setting", "seconds", "units", "unit",
                 "per_second", "peak_gib", "value", "status", "note"]


def gpu_peak_gib(device):
    return peak_memory_mb(device) / 1024


def count_steps(optimizer, taken):
    """Count the optimizer's steps in the list `taken`: the fp16 loss scaler skips the step (and
    AdamW allocates no state) when a gradient overflows."""
    optimizer.register_step_post_hook(lambda *_: taken.append(1))
    return optimizer


@contextlib.contextmanager
def patched(module, **replacements):
    """Monkeypatch-style: module.name = value for the block, then the originals again."""
    originals = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Figures:
    """The rows of --gpu-figures: each printed as it completes, results.csv and results.md
    rewritten after each one (a run killed by its time limit keeps every finished row)."""

    def __init__(self, out, device, sizes, budget_s, toy):
        self.out, self.device, self.sizes, self.toy = out, device, sizes, toy
        self.budget_s = budget_s
        self.rows, self.started = [], time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.started

    def fits(self, part, measure_name, precision, expected_s):
        """False (and a 'skipped' row) when `expected_s` more would overrun --budget-s."""
        if self.elapsed() + expected_s <= self.budget_s:
            return True
        self.add(part=part, measure=measure_name, precision=precision,
                 status=f"skipped: {self.elapsed():.0f} s + ~{expected_s} s expected > "
                        f"--budget-s {self.budget_s:g}")
        return False

    def add(self, **row):
        row = {**{name: "" for name in FIGURE_FIELDS}, "status": "ok", **row}
        if row["units"] and row["seconds"] and row["status"] == "ok":
            row["per_second"] = row["units"] / row["seconds"]
        self.rows.append(row)
        shown = [f"[{self.elapsed():5.0f} s] part {row['part']}", row["measure"],
                 row["precision"], row["setting"]]
        if row["seconds"] != "":
            shown.append(f"{row['seconds']:.3f} s")
        if row["per_second"] != "":
            shown.append(f"{row['per_second']:.3g} {row['unit']}/s")
        if row["peak_gib"] != "":
            shown.append(f"peak {row['peak_gib']:.2f} GiB")
        shown += [row["status"], row["note"]]
        print(" | ".join(str(part) for part in shown if part != ""), flush=True)
        self.save()

    def save(self):
        with open(self.out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIGURE_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        (self.out / "results.md").write_text(figures_markdown(self))
        (self.out / "summary.json").write_text(json.dumps(summary(self), indent=1) + "\n")


class StageTimer:
    """Wraps sail.py's stage functions for one in-process run: seconds (CUDA synchronised) and
    peak memory of every call. Stages nest (generation inside self-labelling): a stage's peak
    counts its inner stages', although each inner stage restarts the device's peak counter."""

    def __init__(self, figures, precision):
        self.figures, self.precision, self.open = figures, precision, []  # open: outer first

    def wrap(self, function, name, units=lambda args, result: "", unit="",
             note=lambda: ""):
        device = self.figures.device

        def timed(*args, **kwargs):
            label = name(args, self.open) if callable(name) else name
            if device.type == "cuda":
                torch.cuda.synchronize()
            current = peak_memory_mb(device)
            for frame in self.open:  # the outer stages keep their peak so far
                frame["peak"] = max(frame["peak"], current)
            reset_peak_memory(device)
            frame = {"label": label, "peak": 0.0}
            self.open.append(frame)
            started, result, status = time.perf_counter(), None, "ok"
            try:
                result = function(*args, **kwargs)
                return result
            except torch.OutOfMemoryError:
                status = "OOM"
                raise
            finally:
                if device.type == "cuda" and status == "ok":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                peak = max(frame["peak"], peak_memory_mb(device))
                self.open.pop()
                for outer in self.open:
                    outer["peak"] = max(outer["peak"], peak)
                self.figures.add(part=1, measure=label, precision=self.precision,
                                 seconds=seconds, units=units(args, result) if status == "ok"
                                 else "", unit=unit, peak_gib=peak / 1024, status=status,
                                 note=note())
        return timed

    def wrappers(self):
        """sail's stage functions, wrapped: sail looks them up at call time, so patching the
        module replaces them inside sail.main too (sail.py itself is unchanged)."""
        def generation(args, open_stages):
            inside = any(frame["label"].startswith("self-labelling") for frame in open_stages)
            return "generation: candidates" if inside else "generation: evaluation images"

        def dpo_pairs(args, result):  # diffusion_dpo(pipe, ref_unet, pairs, args, stage, run)
            run_args = args[3]
            steps = run_args.dpo_steps or math.ceil(len(args[2]) / run_args.effective_batch)
            return steps * run_args.effective_batch

        taken = []  # optimizer steps of the current DPO stage (fp16 skips those that overflow)
        diffusion_dpo, make_optimizer = sail.diffusion_dpo, sail.make_optimizer  # the originals

        def dpo(*args, **kwargs):
            taken.clear()
            return diffusion_dpo(*args, **kwargs)
        return dict(
            make_optimizer=lambda params, args: count_steps(make_optimizer(params, args), taken),
            load_pipeline=self.wrap(plumbing.load_pipeline, "load model"),
            evaluate=self.wrap(sail.evaluate, "evaluation (sample, grid)"),
            judge_candidates=self.wrap(sail.judge_candidates,
                                       "self-labelling (generate, rank, decode pair)"),
            generate=self.wrap(sail.generate, generation,
                               lambda args, result: result.shape[0], "images"),
            implicit_reward=self.wrap(sail.implicit_reward, "ranking (Eq. 8)",
                                      lambda args, result: args[2].shape[0], "images"),
            diffusion_dpo=self.wrap(dpo, lambda args, _: f"DPO {args[4]}", dpo_pairs, "pairs",
                                    lambda: f"optimizer steps taken {len(taken)}"))


def write_random_pairs(folder, count, resolution, prompts, seed=0):
    """`count` seed pairs of random-noise PNGs and their seed_pairs.json: the cost of a DPO step
    does not depend on what the pixels show."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for i in range(count):
        names = [f"{i:03d}_{key}.png" for key in ("chosen", "rejected")]
        for name in names:
            sail.save_image(torch.rand((3, resolution, resolution), generator=generator),
                            folder / name)
        entries.append({"prompt": prompts[i % len(prompts)], "chosen": names[0],
                        "rejected": names[1]})
    (folder / "seed_pairs.json").write_text(json.dumps(entries, indent=1))
    return folder / "seed_pairs.json"


def cached_image_loader(pairs, resolution):
    """plumbing.load_image with the pairs' images decoded once, ahead of the timed steps (as the
    official code's 16 dataloader workers decode them ahead of the step)."""
    cache = {pair[key]: plumbing.load_image(pair[key], resolution)
             for pair in pairs for key in ("chosen", "rejected")}
    return lambda path, size: (cache[path].clone() if size == resolution
                               else plumbing.load_image(path, size))


def whole_runs(figures, model, seed_pairs_file, scratch, precision):
    """Part 1: `sail.py --model <SD 1.5-shaped folder> --iters 1` in this process, one
    --precision, every stage timed. --eval-seeds images per evaluation prompt (sail.py: 4) keep
    fp32 inside the budget; the generation rate is read from the candidates, not evaluation."""
    sizes = figures.sizes
    prompts_file = scratch / "prompts.txt"
    # the iteration's prompts, then one that no seed pair has: the evaluation prompt (sail.py
    # evaluates a real model on prompts no stage trains on)
    prompts_file.write_text("\n".join([*FIGURE_PROMPTS[:sizes["prompts_per_iter"]],
                                       "a white star"]) + "\n")
    out = scratch / f"run-{precision}"
    argv = ["--model", str(model), "--iters", "1", "--precision", precision,
            "--resolution", str(sizes["resolution"]), "--prompts", str(prompts_file),
            "--prompts-per-iter", str(sizes["prompts_per_iter"]),
            "--seed-pairs", str(seed_pairs_file), "--n-candidates", str(sizes["n_candidates"]),
            "--k-draws", str(sizes["k_draws"]), "--sampler", "ddpm",
            "--sample-steps", str(sizes["sample_steps"]),
            "--guidance-scale", str(sizes["guidance_scale"]),
            "--effective-batch", str(sizes["effective_batch"]),
            "--micro-batch", str(sizes["micro_batch"]), "--dpo-steps", str(sizes["dpo_steps"]),
            "--eval-seeds", str(sizes["eval_seeds"]), "--keep-checkpoints", "1", "--out", str(out)]
    print("part 1: python sail.py " + " ".join(argv), flush=True)
    timer = StageTimer(figures, precision)
    whole = timer.wrap(sail.main, "whole run (sail.main)")
    try:
        with patched(sail, **timer.wrappers()), patched(plumbing, EVAL_PROMPTS=1):
            code = whole(argv)
        if code != 0:
            raise RuntimeError(f"sail.main returned {code}")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # two SD 1.5 UNets: 7 GB of disk per precision


def official_dpo_step(unet, ref_unet, vae, text_encoder, scheduler, optimizer, lr_schedule,
                      scaler, pixels, input_ids, beta, device):
    """One Diffusion-DPO optimizer step as the official train.py computes it (read, not copied:
    SalesforceAIResearch/DiffusionDPO train.py at 8d3ee5c, main(), the DPO branch of the loop
    "with accelerator.accumulate(unet)"), SD 1.5, --mixed_precision fp16 (its default):
    - `pixels` (B, 6, H, W): winner and loser concatenated on the channel axis (its collate_fn);
      the step splits them and stacks winners then losers on the batch axis (2B, 3, H, W);
    - VAE (fp16, its weight_dtype) encodes with latent_dist.sample() x scaling_factor;
    - one noise and one t per pair, repeated for winner and loser; noise_scheduler.add_noise;
    - the CLIP text encoder (fp16) on the token ids, repeated twice;
    - theta: fp32 weights, forward under autocast fp16 with fp32 outputs (what accelerate's
      prepare does to a model with mixed_precision fp16); the reference UNet: fp16 weights
      (ref_unet.to(weight_dtype)), no autocast, under no_grad: its errors are fp16 tensors;
    - errors mean over C, H, W; inside = -0.5 beta ((w - l)_theta - (w - l)_ref);
      loss = -logsigmoid(inside).mean();
    - accelerator.backward (fp16 loss scaling), clip_grad_norm_ 1.0, AdamW step (through the
      scaler), lr scheduler step, zero_grad.
    Not reproduced: xformers attention (train.py requires it; both sides here use diffusers'
    default, PyTorch's scaled_dot_product_attention), the dataloader and logging."""
    half = torch.float16
    images = torch.cat(pixels.chunk(2, dim=1))                                  # (2B, 3, H, W)
    with torch.no_grad():
        latents = vae.encode(images.to(device, half)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor                           # (2B, 4, h, w) fp16
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)             # shared by w and l
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      device=device).chunk(2)[0].repeat(2)                      # (2B,)
    noisy = scheduler.add_noise(latents, noise, t)
    hidden = text_encoder(input_ids.to(device))[0].repeat(2, 1, 1)              # (2B, 77, 768) fp16
    with torch.autocast(device.type, dtype=half):
        prediction = unet(noisy, t, hidden).sample
    prediction = prediction.float()
    theta_w, theta_l = (prediction - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    with torch.no_grad():
        ref_prediction = ref_unet(noisy, t, hidden).sample
        ref_w, ref_l = (ref_prediction - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    inside = -0.5 * beta * ((theta_w - theta_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(inside).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    lr_schedule.step()
    optimizer.zero_grad()
    return loss.detach()


def official_versus_sail(figures, model, seed_pairs, scratch, repeats):
    """Part 2: the same batch of --sizes dpo_pairs pairs (one micro-batch, one optimizer step)
    through the official train.py step and through sail.diffusion_dpo, one after the other on
    the same GPU; every measurement holds only its own reference, optimizer and activations."""
    device, sizes = figures.device, figures.sizes
    pairs = (seed_pairs * sizes["dpo_pairs"])[:sizes["dpo_pairs"]]
    resolution, batch = sizes["resolution"], len(pairs)
    pipe = plumbing.load_pipeline(str(model), device)
    unet = pipe.unet
    args = sail.Args(resolution=resolution, effective_batch=batch, micro_batch=batch,
                     dpo_steps=1, lr=1e-8 * 128, checkpoint_every=2)
    latent_shape = (4, resolution // 8, resolution // 8)
    # the step's pairs and prompts (20% empty, as both codes do) as sail's first step draws them
    batch_pairs, prompts, *_ = sail.dpo_step_data(pairs, 0, args, "iter_0", latent_shape,
                                                sail.training_schedule(pipe))
    load = cached_image_loader(pairs, resolution)
    pixels = torch.stack([torch.cat([load(pair[key], resolution) for key in ("chosen", "rejected")])
                          for pair in batch_pairs])                              # (B, 6, H, W)
    input_ids = pipe.tokenizer(prompts, max_length=pipe.tokenizer.model_max_length,
                               padding="max_length", truncation=True, return_tensors="pt").input_ids
    setting = f"{batch} pairs/step"

    def record(name, precision, step, taken, note, steps=1):
        """steps: optimizer steps per call (sail.diffusion_dpo: its set-up is paid once a call)"""
        where = setting + (f", {steps} steps per call" if steps > 1 else "")
        try:
            seconds, peak, _ = measure(step, repeats, device)
        except torch.OutOfMemoryError:
            figures.add(part=2, measure=name, precision=precision, setting=where, status="OOM")
            return
        figures.add(part=2, measure=name, precision=precision, setting=where, seconds=seconds,
                    units=batch * steps, unit="pairs", peak_gib=peak / 1024,
                    note=f"{note}; optimizer steps taken {len(taken)} of {(repeats + 1) * steps}")
        taken.clear()

    # The official step: VAE and text encoder in fp16 (weight_dtype), reference UNet fp16
    pipe.vae.to(torch.float16)
    pipe.text_encoder.to(torch.float16)
    ref_unet = sail.frozen_copy(unet, "fp16")
    taken = []
    optimizer = count_steps(torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999),
                                              weight_decay=1e-2, eps=1e-8), taken)  # train.py's
    lr_schedule = diffusers.optimization.get_scheduler(
        "constant_with_warmup", optimizer=optimizer, num_warmup_steps=500, num_training_steps=2000)
    scaler = torch.amp.GradScaler(device.type)
    scheduler = sail.DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train().requires_grad_(True)

    def official_step():
        return official_dpo_step(unet, ref_unet, pipe.vae, pipe.text_encoder, scheduler,
                                 optimizer, lr_schedule, scaler, pixels, input_ids, args.beta,
                                 device)
    # fp16 loss scaling starts at 2^16 and halves, skipping the optimizer step, at each overflow
    # (both codes: torch's GradScaler): warm up until it steps, so the timed steps are a settled
    # run's, AdamW state included; sail's steps below start from the scale found here
    skipped = 0
    while not taken and skipped < 30:
        official_step()
        skipped += 0 if taken else 1
    settled_scale = scaler.get_scale()
    taken.clear()
    record("official train.py step", "fp16", official_step, taken,
           f"fp16 mixed precision, reference fp16, AdamW, PNGs decoded ahead; {skipped} "
           f"overflowing steps skipped before the loss scale settled at {settled_scale:g}")
    unet.eval().requires_grad_(False)
    unet.zero_grad(set_to_none=True)
    del ref_unet, optimizer, lr_schedule, scaler
    free_memory(device)

    # sail.py's own step, the whole of sail.diffusion_dpo for one optimizer step
    make_optimizer = sail.make_optimizer  # the original, for the counting wrapper below
    # cached: "posteriors" = the seed pairs' VAE posteriors kept (--cache-posteriors, no VAE in
    # the step), "pngs" = only the images decoded ahead (the VAE encodes them in the step), "" =
    # neither (PNGs decoded inside the step)
    for precision, cached, steps in (("fp16", "posteriors", 1), ("bf16", "posteriors", 1),
                                     ("bf16", "posteriors", 5), ("bf16", "pngs", 1), ("bf16", "", 1)):
        sail.cast_frozen_models(pipe, precision)
        ref_unet = sail.frozen_copy(unet, precision)
        run_args = copy.copy(args)
        run_args.precision, run_args.dpo_steps = precision, steps
        run_args.checkpoint_every = steps + 1  # no checkpoint (and no resuming from one)
        run = sail.Run(scratch / f"part2-{precision}-{cached}-{steps}", run_args)
        run.out.mkdir(parents=True)
        run.open_log()
        taken = []  # each call makes its optimizer: count steps, hold no optimizer alive
        replacements = dict(make_optimizer=lambda params, make_args: count_steps(
            make_optimizer(params, make_args), taken))
        if cached == "posteriors":  # as sail.start_run keeps them, filled before the timed steps
            run.posteriors = plumbing.kept_posteriors(pipe.vae, pairs, run_args)
            run.posteriors(list(run.posteriors.chunk_of))
        with patched(sail, **replacements), patched(plumbing, load_image=load if cached else
                                                    plumbing.load_image):
            record("sail.diffusion_dpo step", precision,
                   lambda: sail.diffusion_dpo(pipe, ref_unet, pairs, run_args, "iter_0", run,
                                              loss_scale=settled_scale),
                   taken, {"posteriors": "VAE posteriors kept (--cache-posteriors): no VAE",
                           "pngs": "PNGs decoded ahead, VAE in the step (--no-cache-posteriors)",
                           "": "PNGs decoded and encoded inside the step"}[cached]
                   + (f"; loss scale from {settled_scale:g}" if precision == "fp16" else ""),
                   steps)
        run.log_file.close()
        del ref_unet
        free_memory(device)
    reference_dtype_effect(figures, pipe, prompts, args)
    del pipe, unet
    free_memory(device)


def reference_dtype_effect(figures, pipe, prompts, args):
    """What running Eq. DPO's half-precision reference in its own dtype (sail.py since issue 29,
    plumbing.own_dtype) changes against running it under autocast (before): on one micro-batch
    (random latents, the step's prompts), the reference errors and, theta the fp32 UNet under
    autocast, Eq. DPO's logits and loss, both ways."""
    device, unet = figures.device, pipe.unet
    size = len(prompts)
    shape = (size, 4, args.resolution // 8, args.resolution // 8)
    generator = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn((2, *shape), generator=generator).flatten(0, 1).to(device)
                 for _ in range(2))                                              # (2b, 4, h, w)
    t = torch.randint(0, 1000, (size,), generator=generator).repeat(2).to(device)
    scheduler = sail.training_schedule(pipe)
    for precision in ("bf16", "fp16"):
        sail.cast_frozen_models(pipe, precision)
        cond = sail.map_cond(lambda v: torch.cat([v, v]), sail.encode_text(pipe, prompts, args))
        reference = sail.frozen_copy(unet, precision)
        with torch.no_grad(), sail.autocast(device, precision):
            theta = sail.denoising_error(unet, scheduler, x0, noise, t, cond).chunk(2)
            before = sail.denoising_error(reference, scheduler, x0, noise, t, cond)
            with plumbing.own_dtype(reference):
                after = sail.denoising_error(reference, scheduler, x0, noise, t, cond)
        (loss_before, inside_before), (loss_after, inside_after) = (
            sail.dpo_loss(*theta, *err.chunk(2), args.beta) for err in (before, after))
        change = (loss_after - loss_before).abs().item()
        figures.add(part=2, measure="reference in its own dtype vs under autocast",
                    precision=precision, setting=f"{size} pairs", value=change,
                    note=f"loss change {change:.2e}; max relative change of err_ref "
                         f"{((after - before).abs() / before).max().item():.2e}; max change of "
                         f"Eq. DPO's logits {(inside_after - inside_before).abs().max().item():.3g} "
                         f"(beta {args.beta:g}); loss {loss_before.item():.6f} -> "
                         f"{loss_after.item():.6f}")
        del reference
        free_memory(device)


def reward_spread(figures, model, seed_pairs, scratch):
    """Part 3: Eq. 8 exactly as sail.py's ranking computes it (sail.implicit_reward under
    sail.autocast, theta the fp32 UNet, the reference sail.frozen_copy in the judge's
    precision), over the N candidates of --sizes spread_prompts prompts.

    At theta == ref every reward is 0: the spread max - min over the N candidates is rounding
    alone. The 'real' spread is fp32's after theta takes --sizes spread_dpo_steps steps of
    sail.diffusion_dpo (bf16, AdamW: each weight moves by about lr per step) with the reference
    left where it was, at SD 1.5's lr 1.28e-6 and at 150 x it (2 steps then move theta about as
    far as the ~300 steps of one paper-sized stage); against it, each judge's largest reward
    error (the row's value: as a fraction of the real spread) and how many prompts' best-worst
    pair it changes. Candidates: random N(0, 1) latents (a random-weight sampler draws noise
    anyway). Rows: --reward-precision fp32, fp16 and bf16 (each reference stored in it)."""
    device, sizes = figures.device, figures.sizes
    n, k, resolution = sizes["n_candidates"], sizes["k_draws"], sizes["resolution"]
    pipe = plumbing.load_pipeline(str(model), device)
    unet, scheduler = pipe.unet, sail.DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = FIGURE_PROMPTS[:sizes["spread_prompts"]]
    # (run precision, judge precision, row name)
    judges = [("bf16", judge, f"judge {judge}") for judge in ("fp32", "fp16", "bf16")]
    conditioning = {}
    for precision in {p for p, _, _ in judges}:  # the text encoder in the run's precision
        sail.cast_frozen_models(pipe, precision)
        conditioning[precision] = [sail.encode_text(pipe, [y], SimpleNamespace(resolution=resolution))
                                    for y in prompts]
    references = {judge: sail.frozen_copy(unet, judge) for judge in {j for _, j, _ in judges}}
    latents = [torch.randn((n, 4, resolution // 8, resolution // 8),
                           generator=sail.seeded(0, "spread", i)).to(device)
               for i in range(len(prompts))]                                     # (N, 4, h, w)

    def rewards(precision, judge):
        """(P, N) rewards, and the seconds they took (CUDA synchronised)"""
        if device.type == "cuda":
            torch.cuda.synchronize()
        started, out = time.perf_counter(), []
        for i in range(len(prompts)):
            with sail.autocast(device, judge):
                out.append(sail.implicit_reward(unet, references[judge], latents[i],
                                                conditioning[precision][i], scheduler, 5000.0, k,
                                                sail.seeded(0, "reward", i), 80).float().cpu())
        return torch.stack(out), time.perf_counter() - started                   # (P, N), s

    at_equal = {name: rewards(precision, judge) for precision, judge, name in judges}
    original = {name: value.clone() for name, value in unet.state_dict().items()}
    # theta moves away from the references: 2 real DPO steps on the seed pairs, at SD 1.5's lr
    # (a move of ~2 lr per weight, below fp16's resolution) and at 150 x it (about the move of
    # the ~300 steps of one paper-sized stage)
    for scale in (1, 150):
        unet.load_state_dict(original)
        train_args = sail.Args(resolution=resolution, precision=plumbing.default_precision(),
                               effective_batch=sizes["effective_batch"],
                               micro_batch=sizes["micro_batch"],
                               dpo_steps=sizes["spread_dpo_steps"], lr=1e-8 * 128 * scale,
                               warmup_steps=0, checkpoint_every=sizes["spread_dpo_steps"] + 1)
        sail.cast_frozen_models(pipe, train_args.precision)
        run = sail.Run(scratch / f"part3-{scale}", train_args)
        run.out.mkdir(parents=True)
        run.open_log()
        sail.diffusion_dpo(pipe, references["fp32"], seed_pairs, train_args, "iter_0", run)
        run.log_file.close()
        unet.zero_grad(set_to_none=True)
        free_memory(device)
        # (P, N) rewards and the seconds of each judge, warm by now: its ranking rate
        after = {name: rewards(precision, judge) for precision, judge, name in judges}
        trained = {name: value for name, (value, _) in after.items()}
        truth = trained["judge fp32"]
        real_spread = (truth.max(1).values - truth.min(1).values).mean().item()
        best_worst = torch.stack([truth.argmax(1), truth.argmin(1)], 1)         # (P, 2)
        for precision, judge, name in judges:
            equal, seconds = at_equal[name][0], after[name][1]
            spread = (equal.max(1).values - equal.min(1).values).mean().item()
            pairs = torch.stack([trained[name].argmax(1), trained[name].argmin(1)], 1)
            changed = int((pairs != best_worst).any(1).sum())
            error = (trained[name] - truth).abs().max().item()
            figures.add(part=3, measure=f"Eq. 8 spread, {name}", precision=precision,
                        setting=f"{len(prompts)} prompts x N={n}, K={k}; theta moved "
                                f"{train_args.dpo_steps} steps at {scale} x lr 1.28e-6",
                        seconds=seconds, units=len(prompts) * n, unit="images",
                        note=f"spread at theta == ref {spread:.4g}; real spread (fp32) "
                             f"{real_spread:.4g}; ratio "
                             f"{spread / real_spread if real_spread else float('nan'):.3g}; "
                             f"best-worst pairs changed vs fp32 {changed} of {len(prompts)}; "
                             f"max abs(r - r_fp32) {error:.3g}",
                        value=error / real_spread if real_spread else float("nan"))
    del pipe, unet, references
    free_memory(device)


def throughput_options(figures, model):
    """Part 6 (issue 29, items 2 and 3): what generation and ranking run at, per option.

    Generation: sail.generate at --sizes rate_calls (8, 32, 64) images per pipeline call
    (--generation-batch) in bf16 and fp16 autocast; then, at the largest in bf16, the UNet in
    channels-last memory format and
    torch.compile'd (its first call's extra seconds are the compile time, and the break-even is
    how many images pay it back). A call runs --sizes rate_steps DDPM steps, not 50: every step
    is the same two UNet passes (CFG) and the latents come out undecoded, so images/s at the
    paper's 50 steps is the rate x rate_steps / 50, the row's value. Ranking: Eq. 8 as sail.py
    runs it (sail.implicit_reward inside sail.judging, one prompt's N = 8 candidates a call),
    K = 10, the fp32 and fp16 judges at --reward-batch 40 and 80 (sail.py's default: all N x K
    noisy latents of a prompt at once) and channels-last. Each row: median of --sizes repeats
    calls after a warm-up."""
    device, sizes = figures.device, figures.sizes
    resolution, steps, repeats = sizes["resolution"], sizes["rate_steps"], sizes["repeats"]
    n, k = sizes["n_candidates"], sizes["k_draws"]
    pipe = plumbing.load_pipeline(str(model), device)
    settings = SimpleNamespace(resolution=resolution, guidance_scale=7.5, sample_steps=steps,
                               sampler="ddpm", precision="bf16")
    sail.set_sampler(pipe, settings)
    prompts = FIGURE_PROMPTS * 11

    def generation(images, precision):
        sail.cast_frozen_models(pipe, precision)  # text encoder, VAE; the UNet stays fp32
        run_settings = SimpleNamespace(**{**vars(settings), "precision": precision})
        return lambda: sail.generate(pipe, prompts[:images // n], n, run_settings,
                                     torch.Generator(device).manual_seed(0))

    def add_generation(images, precision, option, work):
        row = dict(part=6, measure="generation", precision=precision,
                   setting=f"{images} images per call, {option}")
        try:
            seconds, peak, _ = measure(work, repeats, device)
        except torch.OutOfMemoryError:
            figures.add(**row, status="OOM")
            return None
        figures.add(**row, seconds=seconds, units=images, unit="images", peak_gib=peak / 1024,
                    value=images / seconds * steps / 50,
                    note=f"{steps} steps a call; value: images/s at 50 steps")
        return seconds
    calls = [int(size) for size in sizes["rate_calls"].split(",")]  # images per pipeline call
    for precision in ("bf16", "fp16"):
        for images in calls:
            add_generation(images, precision, "autocast", generation(images, precision))
    unet, largest = pipe.unet, calls[-1]
    unet.to(memory_format=torch.channels_last)
    plain = add_generation(largest, "bf16", "channels-last", generation(largest, "bf16"))
    unet.to(memory_format=torch.contiguous_format)
    pipe.unet = torch.compile(unet, backend="eager" if figures.toy else "inductor")  # toy: the path
    work = generation(largest, "bf16")
    started = time.perf_counter()
    work()  # the first call compiles
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - started
    compiled = add_generation(largest, "bf16", "torch.compile", work)
    if compiled and plain:
        pays_back = (first - compiled) / max(plain - compiled, 1e-9) * largest
        figures.add(part=6, measure="torch.compile's compile time", precision="bf16",
                    setting=f"{largest} images per call", seconds=first - compiled,
                    note=f"paid back after {pays_back:.0f} images" if plain > compiled
                    else "never paid back: no faster than channels-last uncompiled")
    pipe.unet = unet
    del work
    torch._dynamo.reset()  # drop the compiled graphs and the fake tensors they hold
    gc.collect()
    # Eq. 8: theta the fp32 UNet, the reference a frozen copy in the judge's precision
    scheduler = sail.training_schedule(pipe)
    cond = sail.encode_text(pipe, ["a red circle"], settings)
    candidates = torch.randn((n, 4, resolution // 8, resolution // 8),
                             generator=torch.Generator().manual_seed(0)).to(device)
    for judge in ("fp32", "fp16"):
        reference = sail.frozen_copy(unet, judge)
        judge_settings = SimpleNamespace(reward_precision=judge)
        for batch, option in ((n * k // 2, "autocast"), (n * k, "autocast"),
                              (n * k, "channels-last")):
            channels_last = option == "channels-last"
            for model_ in (unet, reference):
                model_.to(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)

            def rank(batch=batch):
                with sail.judging(pipe, judge_settings):
                    return sail.implicit_reward(unet, reference, candidates, cond, scheduler,
                                                5000.0, k, sail.seeded(0, "rate"), batch)
            measured_row(figures, rank, repeats, dict(
                part=6, measure="ranking (Eq. 8)", precision=f"judge {judge}",
                setting=f"N={n}, K={k}, --reward-batch {batch}, {option}"), units=n,
                unit="images")
        unet.to(memory_format=torch.contiguous_format)
        del reference
        free_memory(device)
    del pipe, unet
    free_memory(device)


def tiny_reward_precision(run, device, prompts=tiny_world.PROMPTS):
    """Eq. 8 in fp32, fp16 and bf16 on a finished tiny run: theta = its step-0 model, the judge's
    reference = its base (as iteration 1 judges). Per judge: the spread of the N rewards at
    theta == ref (base against itself: rounding alone) and with the real theta, the largest
    error against the fp32 judge, and how many prompts' best-worst pair it changes."""
    args = sail.parse_args(["--tiny"])
    pipe = plumbing.load_pipeline(str(run / "tiny_base"), device)
    sail.set_sampler(pipe, args)
    base = pipe.unet
    theta = UNet2DConditionModel.from_pretrained(run / "iter_0" / "unet").to(device)
    scheduler = sail.DDPMScheduler.from_config(pipe.scheduler.config)
    judges = ("fp32", "fp16", "bf16")
    found = {judge: dict(equal=[], real=[], changed=0, error=0.0) for judge in judges}
    for j, prompt in enumerate(prompts):
        pipe.unet = theta  # candidates from the step-0 model, as iteration 1 draws them
        # seed keys "c" (candidate) and "r" (reward): those of the README's measurement
        latents = sail.generate(pipe, [prompt], args.n_candidates, args,
                                [sail.seeded(0, "c", j, c) for c in range(args.n_candidates)])
        cond = sail.encode_text(pipe, [prompt], args)
        rewards = {}
        for judge in judges:
            ref = sail.frozen_copy(base, judge)
            for name, model in (("equal", base), ("real", theta)):
                with sail.autocast(device, judge):
                    rewards[judge, name] = sail.implicit_reward(
                        model, ref, latents, cond, scheduler, args.beta, args.k_draws,
                        sail.seeded(0, "r", j), args.reward_batch)               # (N,)
        tally(found, rewards, "fp32")
    judge_table(found, len(prompts))
    return 0


def tally(found, rewards, truth):
    """One prompt's (N,) rewards per (judge, 'equal' or 'real') added to each judge's figures:
    the spreads, whether its best-worst pair is the truth's, its largest error against it."""
    truth = rewards[truth, "real"]
    for judge, f in found.items():
        equal, r = rewards[judge, "equal"], rewards[judge, "real"]
        f["equal"].append((equal.max() - equal.min()).item())
        f["real"].append((r.max() - r.min()).item())
        f["changed"] += ((int(r.argmax()), int(r.argmin()))
                         != (int(truth.argmax()), int(truth.argmin())))
        f["error"] = max(f["error"], (r - truth).abs().max().item())


def judge_table(found, prompts):
    """The markdown table of tiny_reward_precision and tiny_lora_judge: per judge, the mean spread
    of the N rewards at theta == ref and with the real theta, and its errors against the truth."""
    print("| judge | spread at theta == ref | real spread | ratio | best-worst changed vs fp32 "
          "| max abs(r - r_fp32) | max error / real spread |\n|---|---|---|---|---|---|---|")
    for judge, f in found.items():
        equal, real = statistics.mean(f["equal"]), statistics.mean(f["real"])
        print(f"| {judge} | {equal:.3g} | {real:.3g} | {equal / real:.1%} | {f['changed']} of "
              f"{prompts} | {f['error']:.3g} | {f['error'] / real:.2%} |")


def tiny_lora_judge(run, device, prompts=tiny_world.PROMPTS):
    """Eq. 8 on a half-precision LoRA base (docs/lora.md): theta = a finished tiny LoRA run's base +
    its step-0 adapters (fp32), the reference its base (as iteration 1 judges with --reward-ref
    base), both the one network (plumbing.Rounds). The truth: the base stored in fp32. Against it:
    the base stored in bf16 or fp16, as --lora-rank --precision keeps it, judged in fp32 layer by
    layer (sail.judging, the default --reward-precision) and in the storage's own precision.
    Candidates and text from the fp32 network, the same for every judge."""
    args = sail.parse_args(["--resume", str(run)])
    networks = {}
    for storage in ("fp32", "bf16", "fp16"):
        pipe = plumbing.load_pipeline(str(run / "tiny_base"), device)
        sail.set_sampler(pipe, args)
        sail.cast_frozen_models(pipe, storage, lora=True)  # before the adapters, as sail.main
        plumbing.restore_adapters(pipe.unet, args, run, ["iter_0"])
        networks[storage] = pipe
    judges = {"fp32 base, fp32 (the truth)": ("fp32", "fp32"),
              **{f"{s} base, {j}": (s, j) for s in ("bf16", "fp16") for j in ("fp32", s)}}
    found = {judge: dict(equal=[], real=[], changed=0, error=0.0) for judge in judges}
    scheduler = sail.training_schedule(networks["fp32"])
    for j, prompt in enumerate(prompts):
        with torch.no_grad():
            latents = sail.generate(networks["fp32"], [prompt], args.n_candidates, args,
                                    [sail.seeded(0, "c", j, c) for c in range(args.n_candidates)])
            cond = sail.encode_text(networks["fp32"], [prompt], args)
        rewards = {}
        for judge, (storage, precision) in judges.items():
            pipe = networks[storage]
            base = plumbing.Rounds(pipe.unet, [])
            for name, theta in (("equal", base), ("real", pipe.unet)):
                with sail.judging(pipe, SimpleNamespace(reward_precision=precision)):
                    rewards[judge, name] = sail.implicit_reward(
                        theta, base, latents, cond, scheduler, args.beta, args.k_draws,
                        sail.seeded(0, "r", j), args.reward_batch)               # (N,)
        tally(found, rewards, "fp32 base, fp32 (the truth)")
    judge_table(found, len(prompts))
    return 0


def sdxl_shaped_pipeline(folder, toy):
    """SDXL's architecture with random weights, from configs: its UNet (2.6B parameters; --toy:
    a tiny one with the same conditioning), SD's VAE with SDXL's scaling factor, and two text
    encoders of SDXL's sizes (CLIP ViT-L and OpenCLIP bigG: hidden 768 and 1280, pooled 1280)
    under the word-level tokenizer: the conditioning has SDXL's shapes and cost."""
    if toy:
        base = tiny_world.build_pipeline(folder)
        text_config = base.text_encoder.config.to_dict()
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{**text_config, "projection_dim": 32}))
        unet = UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), norm_num_groups=8, cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8)
        return sail.StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer, unet=unet,
            scheduler=base.scheduler)
    tokenizer = tiny_world.tokenizer(folder)
    tokenizer.model_max_length = 77
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(  # OpenCLIP bigG's sizes
        tokenizer, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return sail.StableDiffusionXLPipeline(
        vae=sd_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer)), text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=sd_scheduler())


def sdxl_step(figures, scratch, repeats):
    """Part 4: one sail.diffusion_dpo optimizer step of an SDXL-shaped model at --sizes
    sdxl_resolution with the SDXL preset (Adafactor), bf16 frozen models, --sizes sdxl_pairs
    pairs, with and without gradient checkpointing (the official code always checkpoints SDXL)."""
    device, sizes = figures.device, figures.sizes
    resolution = sizes["sdxl_resolution"]
    started = time.perf_counter()
    (scratch / "sdxl-tokenizer").mkdir()
    with torch.device(device):  # built where it runs: no 10 GB copy from the CPU
        pipe = sdxl_shaped_pipeline(scratch / "sdxl-tokenizer", figures.toy)
    pipe.scheduler = sail.DDPMScheduler.from_config(pipe.scheduler.config)  # its tensors on the CPU
    pipe = plumbing.prepare_pipeline(pipe, device)
    precision = "bf16"
    sail.cast_frozen_models(pipe, precision)
    ref_unet = sail.frozen_copy(pipe.unet, precision)
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    print(f"part 4: SDXL-shaped pipeline built in {time.perf_counter() - started:.1f} s; UNet "
          f"{parameters / 1e9:.3g}B parameters", flush=True)
    pairs = plumbing.read_seed_pairs(write_random_pairs(
        scratch / "sdxl-pairs", sizes["sdxl_pairs"], resolution, FIGURE_PROMPTS))
    args = sail.Args(**{**sail.SDXL_PRESET, "resolution": resolution}, precision=precision,
                     effective_batch=len(pairs), micro_batch=len(pairs), dpo_steps=1,
                     lr=1e-8 * 128, checkpoint_every=2)
    run = sail.Run(scratch / "part4", args)
    run.out.mkdir(parents=True)
    run.open_log()
    with patched(plumbing, load_image=cached_image_loader(pairs, resolution)):
        for checkpointing in (True, False):
            if checkpointing:
                pipe.unet.enable_gradient_checkpointing()
            else:
                pipe.unet.disable_gradient_checkpointing()
            row = dict(part=4, measure="SDXL DPO step, Adafactor, gradient checkpointing "
                       + ("on" if checkpointing else "off"), precision=precision,
                       setting=f"{len(pairs)} pairs/step, {resolution} px")
            measured_row(figures, lambda: sail.diffusion_dpo(pipe, ref_unet, pairs, args,
                                                             "iter_0", run),
                         repeats, row, units=len(pairs), unit="pairs",
                         note=f"UNet {parameters / 1e9:.3g}B parameters")
            pipe.unet.zero_grad(set_to_none=True)
            pipe.unet.eval().requires_grad_(False)
            free_memory(device)
        del ref_unet
        free_memory(device)
        lora_step(figures, pipe, pairs, args, run, repeats)
    run.log_file.close()
    del pipe
    free_memory(device)


def lora_step(figures, pipe, pairs, args, run, repeats):
    """Part 4's LoRA row: the same step with --lora-rank 8 as sail.py runs it, the UNet's own
    weights frozen in bf16 (no reference copy), fp32 adapters, AdamW, gradient checkpointing."""
    args = dataclasses.replace(args, lora_rank=8, optimizer="adamw", lr=plumbing.LORA_LR["real"])
    row = dict(part=4, measure="SDXL LoRA DPO step, rank 8, AdamW, gradient checkpointing on",
               precision=args.precision)
    try:
        stage, adapters = lora_round(pipe, args, pairs, run)
    except plumbing.InputError as missing:  # peft is optional
        figures.add(**row, status=f"skipped: {missing}")
        return
    measured_row(figures, stage, repeats, {**row, "setting": f"{len(pairs)} pairs/step, "
                                           f"{args.resolution} px"}, units=len(pairs), unit="pairs",
                 note=f"base in {args.precision}, {adapters / 1e6:.3g}M fp32 adapter weights")


def flux_shaped_pipeline(folder, toy):
    """FLUX.1-dev's architecture with random weights, from configs: its transformer (12B
    parameters; --toy: a tiny one with the same conditioning), T5-XXL's encoder (4.8B) and CLIP
    ViT-L under word-level tokenizers (T5's 512 tokens, as the pipeline pads them), FLUX's
    16-channel VAE and its flow-matching scheduler. Built in bf16, as --lora-rank keeps them."""
    clip_words = tiny_world.tokenizer(folder)
    words = ["a", *tiny_world.COLOURS, *tiny_world.SHAPES]
    t5_words = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
                                  *((f"\u2581{word}", -1.0) for word in words)], extra_ids=0)
    if toy:
        sizes = dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                      num_attention_heads=2, axes_dims_rope=(4, 4, 8)),
                     t5=dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4),
                     clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4), vae=(8, 16))
        joint, pooled = 32, 32
    else:
        sizes = dict(transformer=dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                      num_attention_heads=24, axes_dims_rope=(16, 56, 56)),
                     t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64),
                     clip={}, vae=(128, 256, 512, 512))
        joint, pooled = 4096, 768
    clip_words.model_max_length = 77
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16 * 4,  # 2x2 latent patches
                                         joint_attention_dim=joint, pooled_projection_dim=pooled,
                                         guidance_embeds=True, **sizes["transformer"])
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_words), feed_forward_proj="gated-gelu",
                                 **sizes["t5"]))
    clip = CLIPTextModel(clip_text_config(clip_words, **({} if not toy else {
        **sizes["clip"], "hidden_size": pooled})))
    vae = AutoencoderKL(block_out_channels=sizes["vae"], latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * len(sizes["vae"]),
                        up_block_types=("UpDecoderBlock2D",) * len(sizes["vae"]),
                        layers_per_block=2 if not toy else 1, norm_num_groups=32 if not toy else 4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611)
    scheduler = sail.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return sail.FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                             text_encoder=clip, tokenizer=clip_words, text_encoder_2=t5,
                             tokenizer_2=t5_words)


def flux_lora_stage(figures, scratch):
    """Part 5: what a FLUX.1 LoRA stage holds at once, as sail.py runs it with --lora-rank 8
    --precision bf16 --gradient-checkpointing at --sizes flux_resolution: one DPO step of one pair,
    one candidate's generation (the peak does not grow with the step count; --sizes
    flux_sample_steps), and Eq. 8 in fp32 layer by layer (--sizes flux_reward_batch noisy latents
    per call). Random weights (docs/lora.md: memory)."""
    device, sizes = figures.device, figures.sizes
    resolution, started = sizes["flux_resolution"], time.perf_counter()
    (scratch / "flux-tokenizer").mkdir()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: no 48 GB fp32 transient
    try:
        with torch.device(device):
            pipe = flux_shaped_pipeline(scratch / "flux-tokenizer", figures.toy)
    finally:
        torch.set_default_dtype(default)
    pipe = plumbing.prepare_pipeline(pipe, device)
    args = sail.Args(**{**sail.FLUX_PRESET, "resolution": resolution,
                        "sample_steps": sizes["flux_sample_steps"]}, precision="bf16",
                     lora_rank=8, lr=plumbing.LORA_LR["real"], gradient_checkpointing=True,
                     effective_batch=1, micro_batch=1, dpo_steps=1, checkpoint_every=2,
                     n_candidates=1, k_draws=sizes["flux_reward_batch"],
                     reward_batch=sizes["flux_reward_batch"])
    pairs = plumbing.read_seed_pairs(write_random_pairs(
        scratch / "flux-pairs", 1, resolution, FIGURE_PROMPTS))
    run = sail.Run(scratch / "part5", args)
    run.out.mkdir(parents=True)
    run.open_log()
    try:
        dpo_step, _ = lora_round(pipe, args, pairs, run)
    except plumbing.InputError as missing:  # peft is optional
        figures.add(part=5, measure="FLUX.1 LoRA stage", precision="bf16",
                    status=f"skipped: {missing}")
        run.log_file.close()
        return
    weights = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"part 5: FLUX-shaped pipeline built in {time.perf_counter() - started:.1f} s; "
          f"transformer {weights / 1e9:.3g}B parameters", flush=True)
    candidate = []

    def generation():
        candidate[:] = [sail.generate(pipe, FIGURE_PROMPTS[:1], 1, args,
                                      torch.Generator().manual_seed(0))]

    def ranking():  # the candidate just generated, against the base: every adapter off
        with sail.judging(pipe, args):
            return sail.implicit_reward(
                pipe.transformer, plumbing.Rounds(pipe.transformer, []), candidate[0],
                sail.encode_text(pipe, FIGURE_PROMPTS[:1], args), sail.training_schedule(pipe),
                args.beta, args.k_draws, torch.Generator().manual_seed(0), args.reward_batch)
    setting = f"{resolution} px, rank 8, transformer {weights / 1e9:.3g}B"
    for name, work, units, unit in (
            ("DPO step, 1 pair, gradient checkpointing", dpo_step, 1, "pairs"),
            (f"generation, {args.sample_steps} steps", generation, 1, "images"),
            (f"Eq. 8 in fp32 layer by layer, {args.reward_batch} latents per call",
             ranking, args.k_draws, "noisy latents")):
        row = dict(part=5, measure=f"FLUX.1 LoRA: {name}", precision="bf16", setting=setting)
        measured_row(figures, work, 1, row, units=units, unit=unit)  # its peaks: 12B is slow
        free_memory(device)
    run.log_file.close()
    del pipe, dpo_step
    free_memory(device)


PAPER_ITERATION = dict(candidates=80_000, pairs=40_000)  # 10,000 prompts x N = 8; SAIL's stage


def summary(figures):
    """summary.json: the headline figures of the rows so far (None where not measured), and one
    paper-sized SD 1.5 iteration's hours from them: generation at the fastest call size, ranking
    with the default fp32 judge, Diffusion-DPO at sail.py's bf16 pairs/s (posteriors kept);
    torchrun on 8 GPUs divides each stage by 8 (every stage splits its work evenly)."""
    ok = [r for r in figures.rows if r["status"] == "ok" and r["per_second"] != ""]

    def best(part, measure, precision=None, setting=""):
        rates = [r for r in ok if r["part"] == part and r["measure"].startswith(measure)
                 and precision in (None, r["precision"]) and setting in r["setting"]]
        return max(rates, key=lambda r: r["per_second"]) if rates else None
    official = best(2, "official")
    ours = best(2, "sail", "bf16", "steps per call") or best(2, "sail", "bf16")
    generation = max((r["value"] for r in ok if r["part"] == 6 and r["measure"] == "generation"),
                     default=None)
    rank32, rank16 = (best(6, "ranking", f"judge {judge}") for judge in ("fp32", "fp16"))
    rates = dict(generation_images_per_s=generation,
                 ranking_fp32_images_per_s=rank32 and rank32["per_second"],
                 ranking_fp16_images_per_s=rank16 and rank16["per_second"],
                 dpo_pairs_per_s=ours and ours["per_second"])
    hours = None
    if None not in rates.values():
        hours = (PAPER_ITERATION["candidates"] / rates["generation_images_per_s"]
                 + PAPER_ITERATION["candidates"] / rates["ranking_fp32_images_per_s"]
                 + PAPER_ITERATION["pairs"] / rates["dpo_pairs_per_s"]) / 3600
    return dict(
        device=torch.cuda.get_device_name() if figures.device.type == "cuda" else "cpu",
        toy=figures.toy,
        dpo_vs_official=ours and official and ours["per_second"] / official["per_second"],
        dpo_memory_vs_official=ours and official and ours["peak_gib"] / official["peak_gib"],
        **rates, paper_iteration_hours=hours,
        paper_iteration_hours_8_gpus=hours and hours / 8)


def figures_markdown(figures):
    """results.md: the machine, the sizes, then a table per part, with the ratios of part 2."""
    device, rows = figures.device, figures.rows
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    tf32 = (f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN "
            f"{torch.backends.cudnn.allow_tf32}")
    lines = [f"# bench.py --gpu-figures{' --toy' if figures.toy else ''}", "",
             f"Machine: {machine}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"transformers {transformers.__version__}; {tf32}; "
             f"{figures.elapsed():.0f} s so far (--budget-s {figures.budget_s:g}). Random weights, "
             "SD 1.5 / SDXL shapes. Peak memory: torch.cuda.max_memory_allocated, reset at each "
             "measurement's start (CPU: peak resident memory).", "",
             "Sizes: " + ", ".join(f"{k} {v}" for k, v in figures.sizes.items()), ""]

    def table(part, title, header, cells):
        chosen = [r for r in rows if r["part"] == part]
        if not chosen:
            return
        lines.extend([f"## {title}", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(cells(r)) + " |" for r in chosen)
        lines.append("")

    def number(value, spec):
        return "" if value == "" else format(value, spec)

    def rate(r):
        return "" if r["per_second"] == "" else f"{r['per_second']:.3g} {r['unit']}/s"

    table(1, "1. A whole `sail.py --iters 1` per precision, stage by stage",
          ["precision", "stage", "seconds", "rate", "peak GiB", "status", "note"],
          lambda r: [r["precision"], r["measure"], number(r["seconds"], ".2f"), rate(r),
                     number(r["peak_gib"], ".2f"), r["status"], r["note"]])
    for precision in ("fp32", "bf16", "fp16"):  # what the stages leave out: saving, copies
        mine = [r for r in rows if r["part"] == 1 and r["precision"] == precision
                and r["status"] == "ok" and r["seconds"] != ""]
        whole = [r["seconds"] for r in mine if r["measure"] == "whole run (sail.main)"]
        if whole:
            staged = sum(r["seconds"] for r in mine if r["measure"].startswith(
                ("load model", "evaluation", "self-labelling", "DPO")))
            lines.append(f"- {precision}: {whole[0] - staged:.1f} s of the whole run's "
                         f"{whole[0]:.1f} s are outside those stages (saving each stage's UNet, "
                         "frozen copies, moving the base UNet between CPU and GPU)")
    if any(r["part"] == 1 for r in rows):
        lines.append("")
    table(2, "2. Diffusion-DPO step: official train.py vs sail.py (same pairs, same GPU)",
          ["implementation", "precision", "batch", "s/step", "pairs/s", "peak GiB", "status",
           "note"],
          lambda r: [r["measure"], r["precision"], r["setting"], number(r["seconds"], ".3f"),
                     number(r["per_second"], ".3g"), number(r["peak_gib"], ".2f"), r["status"],
                     r["note"]])
    official = [r for r in rows if r["part"] == 2 and r["measure"].startswith("official")
                and r["status"] == "ok"]
    for r in rows:
        if official and r["part"] == 2 and r["measure"].startswith("sail") and r["status"] == "ok":
            lines.append(f"- sail.py {r['precision']} ({r['note']}) / official: pairs/s "
                         f"{r['per_second'] / official[0]['per_second']:.2f}x, peak memory "
                         f"{r['peak_gib'] / official[0]['peak_gib']:.2f}x")
    if official:
        lines.append("")
    table(3, "3. Eq. 8 rounding spread at theta == ref vs the real spread",
          ["run precision", "judge", "setting", "max abs(r - r_fp32) / real spread", "details",
           "ranking rate", "status"],
          lambda r: [r["precision"], r["measure"].split(", ", 1)[-1], r["setting"],
                     number(r["value"], ".4g"), r["note"], rate(r), r["status"]])
    table(4, "4. SDXL-shaped DPO step, SDXL preset",
          ["measure", "precision", "batch", "s/step", "pairs/s", "peak GiB", "status", "note"],
          lambda r: [r["measure"], r["precision"], r["setting"], number(r["seconds"], ".3f"),
                     number(r["per_second"], ".3g"), number(r["peak_gib"], ".2f"), r["status"],
                     r["note"]])
    table(5, "5. A FLUX.1-shaped LoRA stage's peaks (--lora-rank 8, bf16 base)",
          ["measure", "setting", "seconds", "rate", "peak GiB", "status"],
          lambda r: [r["measure"], r["setting"], number(r["seconds"], ".2f"), rate(r),
                     number(r["peak_gib"], ".2f"), r["status"]])
    table(6, "6. Generation and ranking per option (value: generation's images/s at 50 steps)",
          ["measure", "precision", "setting", "s/call", "rate", "value", "peak GiB", "status",
           "note"],
          lambda r: [r["measure"], r["precision"], r["setting"], number(r["seconds"], ".3f"),
                     rate(r), number(r["value"], ".3g"), number(r["peak_gib"], ".2f"),
                     r["status"], r["note"]])
    lines += ["## Summary (summary.json)", "", "```json",
              json.dumps(summary(figures), indent=1), "```"]
    return "\n".join(lines) + "\n"


class Tee:
    """sys.stdout / sys.stderr that also write to the run's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text):
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def gpu_figures(device, out, options):
    """The six parts: 1 (bf16, fp16), 2, 6, 3, 4, 5, then part 1 in fp32, the costliest, last;
    --budget-s skips what would end after it (about 10 minutes for all on an H100; issue 29's
    figures alone: --parts 1,2,6 --precisions bf16, about 6 minutes)."""
    sizes = dict(TOY_SIZES if options.toy else GPU_SIZES)
    for item in filter(None, (options.sizes or "").split(",")):
        key, _, value = item.partition("=")
        if key not in sizes:
            raise SystemExit(f"error: --sizes {key}: unknown (known: {', '.join(sizes)})")
        sizes[key] = type(sizes[key])(value)
    parts = {int(p) for p in options.parts.split(",")}
    figures = Figures(out, device, sizes, options.budget_s, options.toy)
    figures.precisions = options.precisions.split(",")
    print(f"bench --gpu-figures on {device}: parts {sorted(parts)}, precisions "
          f"{figures.precisions}, sizes {sizes}", flush=True)
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2 ** 30
    print(f"scratch folder {tempfile.gettempdir()} (set TMPDIR to move it): {free:.0f} GiB free; "
          "part 1 needs about 30 GiB at SD 1.5 size (sail.py's own disk check)", flush=True)
    failed = False
    # the fp16 loss scaler skips overflowing steps, lr scheduler included: expected, not news
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))

    def attempt(part, name, precision, expected_s, work):
        nonlocal failed
        if not figures.fits(part, name, precision, expected_s):
            return
        try:
            work()
        except torch.OutOfMemoryError as error:  # the row of the stage that ran out is recorded
            figures.add(part=part, measure=name, precision=precision, status="OOM",
                        note=str(error).splitlines()[0][:200])
        except Exception as error:  # one part's failure must not cost the others their GPU time
            traceback.print_exc()
            figures.add(part=part, measure=name, precision=precision,
                        status=f"error: {type(error).__name__}: {error}"[:300])
            failed = True
        free_memory(device)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        model = scratch / "sd15-shaped"
        (scratch / "tokenizer").mkdir()
        if options.toy or not parts & {1, 2, 3, 6}:  # part 4 and 5 build their own
            tiny_world.build_pipeline(scratch / "tokenizer").save_pretrained(model)
        else:
            with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
                pipe = sd15_shaped_pipeline(scratch / "tokenizer")
            pipe.save_pretrained(model)
            del pipe
            free_memory(device)
        seed_pairs_file = write_random_pairs(scratch / "seed", sizes["seed_pairs"],
                                             sizes["resolution"], FIGURE_PROMPTS)
        seed_pairs = plumbing.read_seed_pairs(seed_pairs_file)
        figures.add(part=0, measure="build and save the SD 1.5-shaped pipeline, write seed pairs",
                    seconds=time.perf_counter() - started)
        first = [p for p in figures.precisions if p != "fp32"]
        if 1 in parts:
            for precision in first:
                attempt(1, "whole run", precision, EXPECTED_SECONDS[precision], lambda: whole_runs(
                    figures, model, seed_pairs_file, scratch, precision))
        if 2 in parts:
            attempt(2, "official vs sail", "", EXPECTED_SECONDS[2], lambda: official_versus_sail(
                figures, model, seed_pairs, scratch, sizes["repeats"]))
        if 6 in parts:  # issue 29's figures before the parts that measured earlier issues
            attempt(6, "generation and ranking options", "", EXPECTED_SECONDS[6],
                    lambda: throughput_options(figures, model))
        if 3 in parts:
            attempt(3, "Eq. 8 spread", "", EXPECTED_SECONDS[3], lambda: reward_spread(
                figures, model, seed_pairs, scratch))
        if 4 in parts:
            attempt(4, "SDXL DPO step", "bf16", EXPECTED_SECONDS[4], lambda: sdxl_step(
                figures, scratch, sizes["repeats"]))
        if 5 in parts:
            attempt(5, "FLUX.1 LoRA stage", "bf16", EXPECTED_SECONDS[5], lambda: flux_lora_stage(
                figures, scratch))
        if 1 in parts and "fp32" in figures.precisions:
            attempt(1, "whole run", "fp32", EXPECTED_SECONDS["fp32"], lambda: whole_runs(
                figures, model, seed_pairs_file, scratch, "fp32"))
    figures.add(part=0, measure="total", seconds=figures.elapsed())
    print((out / "results.md").read_text())
    return 1 if failed else 0


def ratio(rows, slow, fast):
    seconds = {r["measure"]: r["seconds"] for r in rows}
    return seconds[slow] / seconds[fast]


def write(out, rows, device, args):
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    model = "tiny world" if args.tiny else f"SD 1.5-shaped, random weights, {args.resolution} px"
    lines = [f"Machine: {machine}; torch {torch.__version__}; {model}, N={args.n_candidates}, "
             f"K={args.k_draws}, {args.sample_steps} sampling steps, micro-batch "
             f"{args.micro_batch}. Median of repeats after a warm-up.", "",
             "| measure | setting | value | ms | per second | peak MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['measure']} | {r['setting']} | {r['value']} | {r['seconds'] * 1000:.1f}"
                     f" | {r['per_second']:.1f} {r['unit']} | {r['peak_mb']:.0f} |")
    lines += ["", f"Batched implicit reward vs loop: {ratio(rows, 'reward: loop', 'reward: batched'):.1f}x "
              "faster (same rewards).",
              f"DPO step, concatenated vs separate forwards: "
              f"{ratio(rows, 'dpo: separate', 'dpo: concatenated'):.2f}x faster (same errors)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scaling.png skipped: matplotlib is not installed (pip install matplotlib)")
        return
    panels = [("scaling: generation", "N"), ("scaling: ranking", "N"), ("scaling: ranking", "K"),
              ("scaling: dpo", "latent"), ("scaling: dpo", "batch")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for axis, (measure_name, setting) in zip(axes, panels):
        points = [r for r in rows if r["measure"] == measure_name and r["setting"] == setting]
        axis.plot([r["value"] for r in points], [r["seconds"] * 1000 for r in points], marker="o")
        axis.set_title(f"{measure_name.split(': ')[1]} vs {setting}")
        axis.set_xlabel(setting)
        axis.set_ylabel("ms")
    figure.suptitle(f"sail.py cost scaling ({machine})")
    figure.tight_layout()
    figure.savefig(out / "scaling.png", dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="output folder; must not exist (default: runs/bench-<time>)")
    parser.add_argument("--quick", action="store_true", help="the smallest size, for tests")
    parser.add_argument("--sd15-shaped", action="store_true",
                        help="Stable Diffusion 1.5's architecture with random weights (for a GPU)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="--sd15-shaped only: image size in pixels (SD 1.5: 512)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory of one SD 1.5-shaped DPO step per memory "
                             "option (precision, gradient checkpointing, optimizer)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="--memory, --cache-gain: pairs per micro-batch")
    parser.add_argument("--cache-gain", action="store_true",
                        help="instead: an SD 1.5-shaped DPO step with the seed pairs' VAE "
                             "posteriors kept and encoded in the step (--resolution, --pairs)")
    parser.add_argument("--reward-precision-of", metavar="RUN",
                        help="instead: Eq. 8 per --reward-precision on a tiny-world run's step-0 "
                             "model against its base (the README's tiny-world table)")
    parser.add_argument("--lora-judge-of", metavar="RUN",
                        help="instead: Eq. 8 on a half-precision base, on a tiny-world LoRA run's "
                             "step-0 adapters against its base (docs/lora.md)")
    parser.add_argument("--gpu-figures", action="store_true",
                        help="instead: the GPU figures (docs/real-models.md) in one run, parts "
                             "1-6 (bench.gpu_figures; --budget-s skips what would not fit)")
    parser.add_argument("--toy", action="store_true",
                        help="--gpu-figures only: toy sizes and tiny models (CPU, seconds)")
    parser.add_argument("--parts", default="1,2,3,4,5,6", help="--gpu-figures only: which parts")
    parser.add_argument("--precisions", default="fp32,bf16,fp16",
                        help="--gpu-figures only: part 1's --precision values")
    parser.add_argument("--sizes", default="",
                        help="--gpu-figures only: key=value,... overriding the counts: "
                             + ", ".join(GPU_SIZES))
    parser.add_argument("--budget-s", type=float, default=450,
                        help="--gpu-figures only: skip a part that would end after this many "
                             "seconds (the estimates are bench.EXPECTED_SECONDS)")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(options.out)
    if out.exists():
        print(f"error: --out {out}: already exists; choose a new folder", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.reward_precision_of:
        return tiny_reward_precision(Path(options.reward_precision_of), device)
    if options.lora_judge_of:
        return tiny_lora_judge(Path(options.lora_judge_of), device)
    if options.gpu_figures:
        out.mkdir(parents=True)  # now: every row is saved as it completes
        log = open(out / "log", "w")
        streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
        try:
            return gpu_figures(device, out, options)
        finally:
            sys.stdout, sys.stderr = streams
            log.close()
    if options.memory:
        memory(device, options.pairs, options.resolution, out)
        return 0
    if options.cache_gain:
        return posterior_cache_gain(device, options.resolution, options.pairs, out, options.quick)
    if options.sd15_shaped:  # SD 1.5's own settings: N = 8, K = 10, DDPM 50 steps, 128 pairs
        args = sail.Args(resolution=options.resolution, precision=plumbing.default_precision())
        args.lr = 1e-8 * args.effective_batch
        with tempfile.TemporaryDirectory() as scratch:
            pipe = plumbing.prepare_pipeline(sd15_shaped_pipeline(Path(scratch)), device)
        latent = options.resolution // 8
        latent_sizes = (latent, latent // 2)  # the native size first: --quick measures only it
    else:
        args = sail.Args(tiny=True, precision="fp32", **sail.TINY_PRESET)
        pipe = plumbing.load_pipeline(str(tiny_world.BASE), device)
        latent_sizes = (8, 16, 32)
    sail.set_sampler(pipe, args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the DPO stage's metrics.jsonl
        bench = Bench(pipe, args, plumbing.read_seed_pairs(Path(__file__).parent / "seed_pairs.json"),
                      Path(scratch))
        run(bench, options.quick, rows, latent_sizes)
    out.mkdir(parents=True)
    write(out, rows, device, args)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
