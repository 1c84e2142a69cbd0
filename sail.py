"""SAIL: Self-Amplified Iterative Learning for diffusion model alignment, in one file.

SAIL (He et al., ICLR 2026, arXiv 2602.05380) aligns a text-to-image diffusion model with human
preferences from a *small* seed set of human-labelled pairs and no external reward model. Step 0
runs Diffusion-DPO (Wallace et al., CVPR 2024) on the seed pairs. Then, each iteration, the model
draws N images for each new prompt, scores them with its own *implicit reward* (how much better it
denoises an image than a reference model does), keeps the best and the worst as a new pair, mixes
these self-labelled pairs with the human seed pairs and runs Diffusion-DPO again from itself.

The algorithm (the paper calls the model after step 0 eps^0; iteration i trains eps^i):

    D_init = human seed pairs (y, x_w, x_l)
    eps^0  = DiffusionDPO(init=base, ref=base, data=D_init)                    # step 0
    for i in 1..I:
        for each new prompt y of iteration i:
            x_1..x_N ~ sample(eps^{i-1}, y)                                    # N = 8
            r_n = implicit_reward(eps^{i-1}, ref_r, y, x_n)                     # Eq. 8, K = 10
            pair = (y, x_argmax r, x_argmin r)                                 # best-worst, Eq. 9
        D_i   = ranked_mixup(self-labelled pairs, D_init, alpha)                # alpha = 0.25
        eps^i = DiffusionDPO(init=eps^{i-1}, ref=eps^{i-1}, data=D_i)

Equation map (numbers as in SPEC.md; each appears again beside the line that computes it):

    Eq. F    forward noising x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps      noisy_latents, diffusion_target
    Eq. RF   flow models: x_t = (1 - sigma) x_0 + sigma eps, v = eps - x_0  (the same two, draw_timesteps)
    Eq. DPO  Diffusion-DPO loss -log sigma(-(beta/2)[...])                  denoising_error, dpo_loss
    Eq. 8    implicit reward r(y, x) = -(beta/2) mean_k[err_theta - err_ref] implicit_reward
    Eq. 9    preference p(A > B) = sigma(r_A - r_B); best-worst pair        preference_probability, best_worst_pair
    mixup    ranked preference mixup, ratio alpha                            ranked_mixup

Run it: `python sail.py --iters 2` aligns SD 1.5 on a GPU, or runs the embedded tiny world without
one (2 CPU cores: about 45 s); --help lists every setting with its paper value (README: every command).

Layout and budget (keep both): settings; PART 1, the algorithm in run order (sections 1-6), in
the file's first half; PART 2, plumbing it calls (7-12). At most 1,000 lines, no function over 60.
Beside it: tiny_world.py, the offline world; plumbing.py, what a reader of SAIL never needs.
"""

import os

# Quiet by default: silence library chatter a user cannot act on (missing torchvision/accelerate
# notes, load progress bars) before the libraries are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from diffusers import (DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       StableDiffusion3Pipeline, StableDiffusionXLPipeline)

import tiny_world
from plumbing import (InputError, Interrupted, LORA_LR, Posteriors, Rounds, Run, TrainingDiverged,
                      absolute_paths, autocast, base_model, base_references, begin_lora_round,
                      cast_frozen_models, check_disk_space, check_model, check_new_folder,
                      check_settings, default_precision, denoiser, explain_the_mix, flag_parser,
                      frozen_copy, judging, kept_posteriors, last_loss_scale, latent_shape_of,
                      load_pipeline, make_optimizer, map_cond, opening_line, own_dtype, pair_paths,
                      parse_flags, pipeline_class, read_data, refuse_changes, restore_model,
                      run_folder, save_grid, save_image, save_model, save_pairs_json, saved_model,
                      saved_settings, schedule_on, seeded, set_sampler, setup_processes,
                      starting_noise, write_config)


# =================================================================================================
# Settings
# =================================================================================================

@dataclass
class Args:
    # --- what to align, and where to write
    model: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={
        "help": "base model: a hub id or a local diffusers folder (paper: SD 1.5, SDXL; also SD3, FLUX)"})
    tiny: bool = field(default=False, metadata={
        "help": "run the embedded tiny world (the default when no GPU is found)"})
    seed_pairs: Optional[str] = field(default=None, metadata={
        "help": "human seed pairs D_init: JSON list of {prompt, chosen, rejected} (paper: ~50K "
                "Pick-a-Pic v2 pairs; real models without it: a subset of --pickapic-dataset)"})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "new prompts, one per line; iteration i takes the i-th disjoint slice (real "
                "models without it: other Pick-a-Pic captions)"})
    heldout_pairs: Optional[str] = field(default=None, metadata={
        "help": "human pairs never trained on: judge_acc/heldout after every stage (real models "
                "without it: a fixed 5 percent of the seed pairs, at most 500; 'none' to skip)"})
    pickapic_dataset: str = field(default="yuvalkirstain/pickapic_v2", metadata={
        "help": "real models without --seed-pairs/--prompts: the default data's Pick-a-Pic v2 "
                "source, a hub name (shards downloaded once, cached) or a folder of its parquet shards"})
    pickapic_pairs: int = field(default=1000, metadata={
        "help": "the default data's seed pairs (1000: a check of the real path; the paper: ~50K)"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder, must not exist yet (default: runs/<world>-<time>)"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    # --- SAIL (SPEC section 3)
    iters: int = field(default=3, metadata={
        "help": "SAIL iterations after step 0 (paper: 3 for SD 1.5, 2 for SDXL)"})
    prompts_per_iter: Optional[int] = field(default=None, metadata={
        "help": "new prompts per iteration (paper: 10K, 20K, 20K; unset: the file split evenly)"})
    n_candidates: int = field(default=8, metadata={"help": "N, images per prompt (paper: 8)"})
    k_draws: int = field(default=10, metadata={
        "help": "K, (t, noise) draws of the implicit reward, Eq. 8 (paper: 10)"})
    beta: float = field(default=5000.0, metadata={"help": "beta of Eq. DPO and Eq. 8 (paper: 5000)"})
    mix_alpha: float = field(default=0.25, metadata={
        "help": "alpha, the self-labelled fraction of each mixed set (paper: 0.25; 1 = no mixup)"})
    keep_top: float = field(default=1.0, metadata={
        "help": "keep this top fraction of self-labelled pairs, ranked by confidence (our choice)"})
    pairs: Literal["best-worst", "random", "none"] = field(default="best-worst", metadata={
        "help": "which candidates form a pair (paper: best-worst; random is its ablation; none is "
                "the control 'iterative seed-only DPO': no self-labelling, seed pairs each round)"})
    reward_ref: Literal["base", "prev"] = field(default="base", metadata={
        "help": "Eq. 8's reference: the base, or the previous round's DPO reference (SPEC 2c)"})
    # --- Diffusion-DPO training
    effective_batch: int = field(default=128, metadata={"help": "pairs per optimizer step (paper: 128)"})
    micro_batch: int = field(default=8, metadata={
        "help": "pairs per forward pass; gradients accumulate up to --effective-batch"})
    optimizer: Literal["adamw", "adafactor"] = field(default="adamw", metadata={
        "help": "optimizer (paper: AdamW for SD 1.5, Adafactor for SDXL)"})
    lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate (unset: 1e-8 x effective batch, the Diffusion-DPO rule; LoRA: 1e-5)"})
    dpo_steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps per DPO stage (unset: one pass over the stage's pairs)"})
    warmup_steps: int = field(default=500, metadata={
        "help": "linear learning-rate warm-up at the start of every DPO stage (Diffusion-DPO "
                "official: constant_with_warmup, 500 steps for SD 1.5, 200 for SDXL)"})
    cfg_dropout: float = field(default=0.2, metadata={
        "help": "fraction of training prompts replaced by '' so CFG keeps working (Diffusion-DPO: 0.2)"})
    pair_noise: Literal["fresh", "prior"] = field(default="fresh", metadata={
        "help": "flow models: a self-labelled pair's eps in Eq. DPO, fresh and shared (Diffusion-DPO) "
                "or each image's starting noise (PNAPO; tiny flow world: worse, docs/evidence-flow.md)"})
    # --- sampling candidates
    resolution: int = field(default=512, metadata={"help": "image size in pixels (SD 1.5: 512)"})
    sampler: Literal["ddpm", "ddim", "euler"] = field(default="ddpm", metadata={
        "help": "sampler for candidates (paper: DDPM for SD 1.5, DDIM for SDXL; SD3 and FLUX: "
                "euler, their own flow-matching Euler)"})
    sample_steps: int = field(default=50, metadata={"help": "denoising steps (paper: 50)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "CFG scale (paper: 7.5)"})
    generation_batch: int = field(default=64, metadata={"help": "images per pipeline call"})
    reward_batch: int = field(default=80, metadata={
        "help": "noisy latents per UNet call of the implicit reward"})
    eval_seeds: int = field(default=4, metadata={
        "help": "images per evaluation prompt in every stage's grid (the same noise every stage)"})
    # --- a control of the tiny world
    oracle_labels: bool = field(default=False, metadata={
        "help": "tiny world: the hidden annotator re-labels each self-labelled pair ('all-labels DPO')"})
    tiny_world: str = field(default="shapes", metadata={"help": "shapes, offpolicy or taste (docs/evidence-2.md)"})
    tiny_model: Literal["ddpm", "flow"] = field(default="ddpm", metadata={
        "help": "tiny world: ddpm (tiny_base/) or flow, an SD3-shaped rectified flow (tiny_flow_base/)"})
    # --- a long job: resume, memory (plumbing; none of these changes the algorithm)
    resume: Optional[str] = field(default=None, metadata={
        "help": "continue the interrupted run in this folder where it stopped (its config.json "
                "holds every setting; a flag given again must agree with it)"})
    checkpoint_every: int = field(default=50, metadata={
        "help": "a training checkpoint every this many DPO steps (generation: every prompt batch)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest this many checkpoints"})
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = field(default=None, metadata={
        "help": "dtype of the frozen models (LoRA: the UNet's own weights too) and of autocast "
                "around the trained UNet (fp32 weights) (unset: bf16 on a GPU that has it, else fp32)"})
    reward_precision: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={
        "help": "precision of Eq. 8 and its frozen reference, whatever --precision is: beta/2 = "
                "2500 magnifies rounding (docs/real-models.md: fp16 ranks 4x faster, bf16 worst)"})
    cache_posteriors: bool = field(default=True, metadata={
        "help": "encode the seed pairs' images once a run, not at every step (tiny world: off)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the trained UNet's activations in the backward pass: less memory, more time"})
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = field(default="none", metadata={
        "help": "live curves: also send metrics.jsonl and each stage's grid to <out>/tensorboard, W&B or Trackio"})
    # --- LoRA: less memory, the same algorithm (plumbing.py)
    lora_rank: int = field(default=0, metadata={
        "help": "train rank-R fp32 adapters (attention projections; SD3, FLUX: as their diffusers "
                "scripts) on the frozen UNet, a round's own each round; the DPO reference: that "
                "round's off (0: full fine-tuning; diffusers' DPO: 8)"})
    lora_alpha: Optional[float] = field(default=None, metadata={
        "help": "LoRA alpha: the adapters' update B A is scaled by alpha / rank (unset: = rank)"})
    save_merged: bool = field(default=False, metadata={
        "help": "LoRA: also save each stage's UNet, its rounds merged in fp32 (<stage>/unet; SD 1.5: 3.4 GB)"})


# #################################################################################################
#                                PART 1: THE ALGORITHM, in run order
# #################################################################################################

# =================================================================================================
# 1. Diffusion-DPO loss                                                (Eq. F, Eq. RF, Eq. DPO)
# =================================================================================================

def is_flow(scheduler):
    """Rectified flow (SD3, FLUX: a flow-matching schedule) rather than DDPM diffusion (SD, SDXL)?"""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def draw_timesteps(scheduler, n, generator):
    """(n,) indices t ~ U{0..T-1} into the training schedule: Diffusion-DPO draws SD's t the way
    SD trained. Flow models too, where sigmas[t] carries the scheduler's shift: uniform t beat
    logit-normal (SD3's training density) for the loss in the tiny flow world (results/flow-t/)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)


def at(table, t, x0):
    """table[t] of a noise schedule, shaped to broadcast over latents: (B, 1, 1, 1)."""
    return table.to(x0.device)[t].view(-1, 1, 1, 1)


def noisy_latents(scheduler, x0, noise, t):
    """Eq. F (Eq. RF for flow models): the forward process jumps straight from x_0 to x_t."""
    if is_flow(scheduler):
        sigma = at(scheduler.sigmas, t, x0)                                      # (B, 1, 1, 1)
        # Eq. RF: x_t = (1 - sigma_t) x_0 + sigma_t eps, the straight line from image to noise
        return (1 - sigma) * x0 + sigma * noise
    a_t = at(scheduler.alphas_cumprod, t, x0)                                    # (B, 1, 1, 1)
    # Eq. F: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def diffusion_target(scheduler, x0, noise, t):
    """What the model predicts, per its scheduler (never assumed)."""
    if is_flow(scheduler):  # Eq. RF: the velocity d x_t / d sigma = eps - x_0 (SD3, FLUX)
        return noise - x0
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":  # SD 1.5, SDXL: predict the noise eps
        return noise
    if prediction_type == "v_prediction":  # SD 2.x (Salimans & Ho 2022)
        a_t = at(scheduler.alphas_cumprod, t, x0)
        # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
        return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0
    raise InputError(f"prediction_type {prediction_type!r} is not supported "
                     "(supported: epsilon, v_prediction)")


def model_time(scheduler, t):
    """The timestep the model is told: t (DDPM), or sigma_t T, the flow scheduler's own timesteps."""
    return scheduler.timesteps.to(t.device)[t] if is_flow(scheduler) else t


def denoising_error(unet, scheduler, x0, noise, t, cond):
    """err_m(x): how badly model m denoises x_0 at (t, eps); (B,) per-sample errors.

    The one function behind the loss and the implicit reward.
    """
    x_t = noisy_latents(scheduler, x0, noise, t)                                # (B, C, h, w)
    prediction = predict(unet, x_t, model_time(scheduler, t), cond)             # (B, C, h, w)
    target = diffusion_target(scheduler, x0, noise, t)
    # Eq. DPO: err_m(x) = ||target - m(x_t, y, t)||^2, the mean over C, H, W of each sample
    # (as in the Diffusion-DPO official code), in float32 whatever the models' precision. Flow
    # models: the velocity error, each model's own training loss term (Flow-DPO, see README)
    return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))    # (B,)


def dpo_loss(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta):
    """Eq. DPO on (B,) per-sample errors -> (scalar loss, (B,) logits `inside`).

    At theta == ref, inside = 0 and the loss is ln 2. The loss falls when theta lowers its error
    on the winner more than the reference does, and rises when it does so on the loser.
    """
    # Eq. DPO: inside = -(beta/2) * [(err_theta(x_w) - err_theta(x_l)) - (err_ref(x_w) - err_ref(x_l))]
    inside = -(beta / 2) * ((err_theta_w - err_theta_l) - (err_ref_w - err_ref_l))  # (B,)
    # Eq. DPO: loss = -log sigma(inside), mean over the batch
    loss = -F.logsigmoid(inside).mean()
    return loss, inside


# =================================================================================================
# 2. Implicit reward                                                              (Eq. 8, Eq. 9)
# =================================================================================================

def implicit_reward(unet, ref_unet, latents, text_emb, scheduler, beta, k, generator,
                    batch_size=None):
    """Eq. 8 for the N candidate latents (N, C, h, w) of one prompt: (N,) rewards.
        r(y, x) = -(beta/2) * (1/K) * sum_k [err_theta(x; t_k, eps_k) - err_ref(x; t_k, eps_k)]
    `text_emb`: the prompt's conditioning, a (1, L, D) tensor or encode_text's dict (or a row per
    candidate, to judge images of different prompts in one call). The K draws (t_k, eps_k) come from
    `generator`, shared by all N candidates (common random numbers, our choice SPEC 2a): candidates
    differ by their images, not by the draws. The N*K noisy latents go through each model in
    batches of `batch_size` (default: all at once)."""
    n = latents.shape[0]
    cond = text_emb if isinstance(text_emb, dict) else {"encoder_hidden_states": text_emb}
    # K draws (t_k as the model trained, eps_k ~ N(0, I)), the same for every candidate (SPEC 2a)
    t = draw_timesteps(scheduler, k, generator)                                           # (K,)
    noise = torch.randn((k, *latents.shape[1:]), generator=generator)                     # (K, C, h, w)
    device = latents.device
    x0 = latents.repeat_interleave(k, dim=0)                  # (N*K, C, h, w): row n*K + j = candidate n, draw j
    noise, t = noise.to(device).repeat(n, 1, 1, 1), t.to(device).repeat(n)  # (N*K, C, h, w), (N*K,)
    # float32 like the latents: autocast lowers it where --reward-precision asks (the text
    # encoders may be stored in bf16 while Eq. 8 runs in fp32)
    cond = map_cond(lambda v: v.float().repeat_interleave(n * k // len(v), dim=0), cond)    # (N*K, L, D)
    batch_size = batch_size or n * k
    err = {}
    with torch.no_grad():
        for name, model in (("theta", unet), ("ref", ref_unet)):
            err[name] = torch.cat([
                denoising_error(model, scheduler, x0[s:s + batch_size], noise[s:s + batch_size],
                                t[s:s + batch_size], map_cond(lambda v: v[s:s + batch_size], cond))
                for s in range(0, n * k, batch_size)]).view(n, k)                         # (N, K)
    # Eq. 8: r = -(beta/2) * mean_k [err_theta - err_ref]
    return -(beta / 2) * (err["theta"] - err["ref"]).mean(dim=1)                          # (N,)


def preference_probability(reward_a, reward_b):
    """Eq. 9: p(x_A > x_B | y) = sigma(r(y, x_A) - r(y, x_B))."""
    return torch.sigmoid(reward_a - reward_b)


# =================================================================================================
# 3. Self-labelling: generate, rank, pair
# =================================================================================================

def generate(pipe, prompts, n, args, generator):
    """n images for each prompt with the pipeline's own sampler -> latents (P*n, C, h, w), float32.
    `generator`: one, or one per image (prompt-major): each image's noise is its own, whatever else
    shares the batch."""
    with autocast(pipe.device, args.precision):
        latents = pipe(prompt=prompts, num_images_per_prompt=n, guidance_scale=args.guidance_scale,
                       num_inference_steps=args.sample_steps, height=args.resolution,
                       width=args.resolution, generator=generator, output_type="latent").images
    if isinstance(pipe, FluxPipeline):  # FLUX hands back its 2x2-patch tokens (P*n, hw/4, 4C)
        latents = FluxPipeline._unpack_latents(latents, args.resolution, args.resolution,
                                               pipe.vae_scale_factor)
    return latents.float()


def best_worst_pair(rewards):
    """Best-worst selection: (argmax r, argmin r), the pair with the largest Eq. 9 probability among
    all N(N-1)/2 pairs; None on a tie (p == 0.5 within float tolerance: no preference, so no pair,
    as Diffusion-DPO drops ties)."""
    best, worst = int(rewards.argmax()), int(rewards.argmin())
    if torch.isclose(rewards[best], rewards[worst]):
        return None
    return best, worst


def random_pair(rewards, generator):
    """Ablation: two random candidates, labelled by Eq. 9 (winner = higher reward); None on a tie."""
    a, b = torch.randperm(len(rewards), generator=generator)[:2].tolist()
    if torch.isclose(rewards[a], rewards[b]):
        return None
    return (a, b) if preference_probability(rewards[a], rewards[b]) > 0.5 else (b, a)


def judge_candidates(pipe, judge_ref, prompts, indices, args, stage):
    """Generate N candidates per prompt with the current model, judge them with Eq. 8, pick a pair.

    `indices` number the prompts within the whole prompt file: candidate c of prompt j always
    comes from the generator (stage, j, c), however prompts are batched or split over processes.
    Returns, per prompt, None on a tie or (latents (2, C, h, w), images (2, 3, H, W), r_w, r_l, p,
    starting noises (2, C, h, w)), chosen first: the latents Eq. 8 judged, which DPO trains on."""
    n = args.n_candidates
    scheduler = training_schedule(pipe)
    keys = [(args.seed, stage, "candidate", j, c) for j in indices for c in range(n)]
    latents = generate(pipe, prompts, n, args, [seeded(*key) for key in keys])  # (P*N, C, h, w)
    noises = starting_noise(pipe, latents.shape, [seeded(*key) for key in keys])  # as it drew them
    cond = encode_text(pipe, prompts, args)                               # (P, L, D)
    found = []
    for p, j in enumerate(indices):
        candidates = latents[p * n:(p + 1) * n]                           # (N, C, h, w)
        generator = seeded(args.seed, stage, "reward", j)
        with judging(pipe, args):  # in --reward-precision
            rewards = implicit_reward(denoiser(pipe), judge_ref, candidates,
                                      map_cond(lambda v: v[p:p + 1], cond), scheduler,
                                      args.beta, args.k_draws, generator, args.reward_batch)  # (N,)
        chosen = (best_worst_pair(rewards) if args.pairs == "best-worst"
                  else random_pair(rewards, generator))
        if chosen is None:
            found.append(None)
            continue
        r_w, r_l = rewards[chosen[0]], rewards[chosen[1]]
        pair = candidates[list(chosen)]                                   # (2, C, h, w)
        images = decode_latents(pipe.vae, pair).cpu()                     # (2, 3, H, W), to look at
        found.append((pair.cpu(), images, r_w.item(), r_l.item(),
                      preference_probability(r_w, r_l).item(),            # Eq. 9
                      noises[p * n:(p + 1) * n][list(chosen)].cpu()))     # (2, C, h, w)
    return found


# =================================================================================================
# 4. Ranked preference mixup
# =================================================================================================

def ranked_mixup(self_pairs, seed_pairs, alpha, rng, keep_top=1.0):
    """D_i: rank self-labelled pairs by confidence, keep the top fraction, mix with seed pairs.
    A fraction `alpha` of D_i is self-labelled and 1 - alpha is human seed pairs, so |D_i| = |S_i| /
    alpha (our reading of the paper's "ranked preference mixup", SPEC section 2). Seed pairs are
    drawn without replacement, with replacement only if the seed set is too small."""
    # confidence sigma(r_w - r_l) (Eq. 9) is monotone in the margin r_w - r_l: rank by it
    ranked = sorted(self_pairs, key=lambda p: p["reward_chosen"] - p["reward_rejected"],
                    reverse=True)
    kept = ranked[:max(1, round(keep_top * len(ranked)))] if ranked else []
    # |D_i| = |S_i| / alpha  =>  seed pairs = |S_i| (1 - alpha) / alpha
    n_seed = round(len(kept) * (1 - alpha) / alpha)
    seeds = (rng.sample(seed_pairs, n_seed) if n_seed <= len(seed_pairs)  # without replacement
             else rng.choices(seed_pairs, k=n_seed))
    return kept + seeds


# =================================================================================================
# 5. Diffusion-DPO training: one step's data, one micro-batch's loss (their loop: section 9)
# =================================================================================================

def dpo_step_data(pairs, step, args, stage, latent_shape, scheduler):
    """The global batch of optimizer step `step` and its random draws, the same in every process:
    positions step*B .. step*B + B-1 of an endless sequence of shuffled passes over `pairs`; pass e
    and step s have generators of their own, so no earlier step is replayed."""
    size, n = args.effective_batch, len(pairs)
    positions = range(step * size, (step + 1) * size)
    orders = {e: torch.randperm(n, generator=seeded(args.seed, stage, "pass", e)).tolist()
              for e in {position // n for position in positions}}
    batch = [pairs[orders[position // n][position % n]] for position in positions]
    generator = seeded(args.seed, stage, "step", step)
    # 20% empty prompts keep classifier-free guidance alive (Diffusion-DPO official)
    dropped = (torch.rand(size, generator=generator) < args.cfg_dropout).tolist()
    prompts = ["" if drop else pair["prompt"] for drop, pair in zip(dropped, batch)]
    # Eq. DPO: winner and loser share the same t and the same eps (repeated in dpo_micro_batch)
    t = draw_timesteps(scheduler, size, generator)                                # (B,)
    noise = torch.randn((size, *latent_shape), generator=generator)                 # (B, C, h, w)
    posterior_noise = torch.randn((2, size, *latent_shape), generator=generator)    # winners, losers
    return batch, prompts, t, noise, posterior_noise


def dpo_micro_batch(model, ref_unet, scheduler, x0, t, noise, cond, beta):
    """Eq. DPO on one micro-batch of b pairs, x0 and noise its b winners' then b losers' (a pair
    shares t; eps too, see training_noise) -> (loss, (b,) logits, (2b,) err_theta, err_ref)."""
    shared = (noise, t.repeat(2))                                   # (2b, C, h, w), (2b,)
    cond = map_cond(lambda v: torch.cat([v, v]), cond)              # (2b, L, D)
    err_theta = denoising_error(model, scheduler, x0, *shared, cond)                 # (2b,)
    with torch.no_grad(), own_dtype(ref_unet):  # the reference in its own precision (plumbing)
        err_ref = denoising_error(ref_unet, scheduler, x0, *shared, cond)            # (2b,)
    loss, inside = dpo_loss(*err_theta.chunk(2), *err_ref.chunk(2), beta)
    return loss, inside, err_theta.detach(), err_ref


# =================================================================================================
# 6. The SAIL loop
# =================================================================================================

def sail(args, pipe, data, run):
    """Step 0 and `args.iters` SAIL iterations, every stage saved under run.out (finish_stage).

    `data`: seed_pairs (D_init), heldout (human pairs never trained on), prompts (the iterations'
    new prompts) and eval_prompts (the fixed prompts of every stage's grid). A resumed run skips
    the finished stages and continues the first unfinished one from its saved progress.
    """
    set_sampler(pipe, args)
    seed_pairs, prompts = data["seed_pairs"], data["prompts"]
    base_unet, judge_base = base_references(pipe, args)  # eps_base frozen, for step 0 and Eq. 8
    finished = [stage for stage in run.stages[1:] if run.finished(stage)]
    if finished:  # resuming: the current model is the last finished stage's
        restore_model(pipe, args, run, finished)
    if not run.finished("base"):
        finish_stage(pipe, args, run, data, "base", time.time(), {}, judge_base)

    # Step 0: Diffusion-DPO on the human seed pairs, init = ref = base
    if not run.finished("iter_0"):
        started = time.time()
        summary = diffusion_dpo(pipe, begin_round(pipe, args, "iter_0", base_unet), seed_pairs,
                                args, "iter_0", run)
        base_unet.to("cpu")
        finish_stage(pipe, args, run, data, "iter_0", started, {"pairs": len(seed_pairs), **summary},
                     judge_base)

    per_iter = args.prompts_per_iter or len(prompts) // max(args.iters, 1)
    for i in range(1, args.iters + 1):
        stage = f"iter_{i}"
        if run.finished(stage):
            continue
        started = time.time()
        judge_ref = reward_reference(args, run, judge_base, i - 1, denoiser(pipe))  # eps^{i-1} judges
        first = (i - 1) * per_iter
        new_prompts = prompts[first:i * per_iter]  # fresh, disjoint from earlier iterations'
        self_pairs, ties, extra = [], 0, {}
        if args.pairs != "none":  # "none": the iterative seed-only DPO control, seed pairs only
            self_pairs, ties, extra = self_label(pipe, judge_ref.to(pipe.device), new_prompts,
                                                 first, args, run, stage)
        judge_ref.to("cpu")
        save_pairs_json(run, stage, self_pairs)
        mixed = (ranked_mixup(self_pairs, seed_pairs, args.mix_alpha,
                              random.Random(f"{args.seed}-{stage}"), args.keep_top)
                 if self_pairs else list(seed_pairs))
        n_self = sum(1 for p in mixed if "confidence" in p)
        explain_the_mix(args, run, stage, self_pairs, ties, len(mixed) - n_self, len(seed_pairs))
        # Iteration i: Diffusion-DPO from the current model, the current model as reference
        ref_unet = begin_round(pipe, args, stage)
        summary = diffusion_dpo(pipe, ref_unet, mixed, args, stage, run, last_loss_scale(run, i))
        del ref_unet
        finish_stage(pipe, args, run, data, stage, started, {
            "self_pairs": n_self, "seed_pairs": len(mixed) - n_self, "ties": ties, **summary,
            **extra}, judge_base)


# #################################################################################################
#                                  PART 2: PLUMBING
# #################################################################################################

# =================================================================================================
# 7. Where model families differ: text, latents, the denoiser's call (SD, SDXL, SD3, FLUX)
# =================================================================================================

def encode_text(pipe, prompts, args):
    """Prompts -> the denoiser's conditioning kwargs, through the pipeline's own text path (training
    conditions exactly as sampling does). The one place where the families differ:
      SD 1.5  {"encoder_hidden_states": (B, 77, 768)}
      SDXL    (B, 77, 2048), plus "added_cond_kwargs": pooled text (B, 1280) and time ids (B, 6)
      SD3     (B, 77 + 256, 4096) from two CLIPs and T5 (zeros without T5), pooled (B, 2048)
      FLUX    T5's (B, 512, 4096), CLIP's pooled (B, 768), FLUX.1-dev's guidance scale (B,)"""
    if isinstance(pipe, StableDiffusionXLPipeline):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device,
                                                  do_classifier_free_guidance=False)
        # time ids = (original h, w, crop top, crop left, target h, w): we train and sample
        # uncropped at one resolution (our choice; the pipeline samples with the same ids)
        size = args.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype,
                                device=pipe.device).repeat(len(prompts), 1)       # (B, 6)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    if isinstance(pipe, StableDiffusion3Pipeline):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.device,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}
    if isinstance(pipe, FluxPipeline):  # its text position ids are all zero: predict makes them
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.device)
        cond = {"encoder_hidden_states": hidden, "pooled_projections": pooled}
        if pipe.transformer.config.guidance_embeds:  # guidance-distilled: the scale is an input
            cond["guidance"] = torch.full((len(prompts),), args.guidance_scale, device=pipe.device)
        return cond
    hidden, _ = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return {"encoder_hidden_states": hidden}                                    # (B, L, D)


def predict(unet, x_t, t, cond):
    """The denoiser's output at (x_t, t): (B, C, h, w) like x_t. UNets and SD3's transformer take
    the latents and the scheduler's timestep; FLUX's takes 2x2 latent patches as tokens, their
    positions, and t / 1000 (as FluxPipeline calls it; the model multiplies by 1000 itself)."""
    if "guidance_embeds" not in getattr(unet, "module", unet).config:  # not FLUX (DDP: .module)
        return unet(x_t, timestep=t, **cond).sample
    b, c, h, w = x_t.shape
    tokens = FluxPipeline._pack_latents(x_t, b, c, h, w)                       # (B, hw/4, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    text_ids = x_t.new_zeros(cond["encoder_hidden_states"].shape[1], 3)         # (L, 3)
    out = unet(tokens, timestep=t / 1000, img_ids=image_ids, txt_ids=text_ids, **cond).sample
    return FluxPipeline._unpack_latents(out, h, w, 1)                          # (B, C, h, w)


def training_schedule(pipe):
    """A fresh copy of the schedule the model trained on (the loss's and Eq. 8's), whatever sampler
    draws candidates: DDPM's alphas (SD, SDXL) or flow matching's sigmas (SD3, FLUX)."""
    kind = FlowMatchEulerDiscreteScheduler if is_flow(pipe.scheduler) else DDPMScheduler
    return schedule_on(kind.from_config(pipe.scheduler.config), pipe.device)


def posterior_sample(vae, mean, std, noise):
    """x_0 (B, C, h, w) as the denoiser expects it, from the VAE's posterior of images (mean, std:
    plumbing.vae_posterior) and a (B, C, h, w) noise: mean + std * noise, Diffusion-DPO's
    latent_dist.sample() with the noise passed in so that a resume and every process draw the same."""
    x0 = mean.float() + std.float() * noise.to(mean.device)
    return (x0 - (vae.config.shift_factor or 0)) * vae.config.scaling_factor  # SD3, FLUX: shifted


def decode_latents(vae, latents):
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], float32."""
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0)
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype)).sample                      # in [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# =================================================================================================
# 8. Data: seed pairs, prompts, images, latents
# =================================================================================================

def training_latents(pipe, batch, posterior_noise, posteriors):
    """x_0 of a micro-batch's winners then losers: (2b, C, h, w).

    A self-labelled pair trains on exactly the latents Eq. 8 ranked, saved when it was judged (a
    round trip through its PNG and the VAE moves a latent by ~25% and reorders the ranking, SPEC
    section 2). Seed pairs are images: their VAE posteriors (`posteriors`, plumbing.Posteriors: kept
    once a run on real models), sampled as in Diffusion-DPO with the step's posterior noise.
    """
    x0 = torch.empty((2, len(batch), *posterior_noise.shape[2:]), device=pipe.device)  # (2,b,C,h,w)
    images = [i for i, pair in enumerate(batch) if "chosen_latents" not in pair]
    if images:
        mean, std = posteriors([batch[i][key] for key in ("chosen", "rejected") for i in images])
        encoded = posterior_sample(pipe.vae, mean, std,
                                   posterior_noise[:, images].flatten(0, 1))      # (2e, C, h, w)
        x0[:, images] = encoded.view(2, len(images), *x0.shape[2:])
    for i, pair in enumerate(batch):
        if "chosen_latents" in pair:
            x0[:, i] = torch.stack([torch.load(pair[f"{key}_latents"], weights_only=True)
                                    for key in ("chosen", "rejected")])             # (2, C, h, w)
    return x0.flatten(0, 1)                                                         # (2b, C, h, w)


def training_noise(batch, noise):
    """eps of a micro-batch's winners then losers: (2b, C, h, w). Diffusion-DPO: a pair's winner and
    loser share the step's fresh `noise` (b, C, h, w). --pair-noise prior (PNAPO, Lu et al. 2026;
    flow models): a self-labelled pair's images keep the noise they were sampled from, so Eq. RF's
    x_t = (1 - sigma) x_0 + sigma eps_prior lies near the nearly straight path the sampler took."""
    eps = noise.repeat(2, 1, 1, 1)                                                  # (2b, C, h, w)
    for i, pair in enumerate(batch):
        for side, key in enumerate(("chosen", "rejected")):
            if f"{key}_noise" in pair:  # human seed pairs have none: fresh, shared
                eps[side * len(batch) + i] = torch.load(pair[f"{key}_noise"], weights_only=True)
    return eps


# =================================================================================================
# 9. The training loop (sections 1 and 5 are its equations) and each round's references
# =================================================================================================

def accumulate_gradients(model, ref_unet, pipe, scheduler, data, args, run, scaler):
    """One optimizer step's gradients: this process's share of the global batch, in micro-batches.

    Returns the step's metrics, averaged over micro-batches and processes.
    """
    batch, prompts, t, noise, posterior_noise = data
    # draws to the device once, metrics read once a step: a host-GPU copy waits for the GPU's queue
    t, noise, posterior_noise = (x.to(pipe.device) for x in (t, noise, posterior_noise))
    per_process = args.effective_batch // run.world
    micro = min(args.micro_batch, per_process)
    mine = range(run.rank * per_process, (run.rank + 1) * per_process, micro)
    sums = torch.zeros(5, device=pipe.device)
    for offset in mine:
        part = slice(offset, offset + micro)
        x0 = training_latents(pipe, batch[part], posterior_noise[:, part],
                              run.posteriors or Posteriors(pipe.vae, args.resolution))
        cond = encode_text(pipe, prompts[part], args)                               # (b, L, D)
        # DDP averages gradients over processes at the last micro-batch's backward only
        last = offset == mine[-1]
        with (contextlib.nullcontext() if last or run.world == 1 else model.no_sync()):
            with autocast(pipe.device, args.precision):
                loss, inside, err_theta, err_ref = dpo_micro_batch(
                    model, ref_unet, scheduler, x0, t[part],
                    training_noise(batch[part], noise[part]), cond, args.beta)
            scaler.scale(loss / len(mine)).backward()
        # TRL's names: rewards/chosen = -(beta/2)(err_theta_w - err_ref_w), one draw of Eq. 8
        r_w, r_l = (-(args.beta / 2) * (err_theta - err_ref)).chunk(2)
        sums += torch.stack([loss.detach(), (inside > 0).float().mean(), r_w.mean(), r_l.mean(),
                             inside.mean()])
    values = run.mean(sums / len(mine))  # the same numbers in every process
    return dict(zip(("loss", "implicit_acc", "rewards/chosen", "rewards/rejected",
                     "rewards/margins"), values.tolist()))


MAX_OVERFLOWS = 30  # fp16: a step whose gradients overflow this often in a row has diverged


def optimizer_step(model, ref_unet, pipe, scheduler, data, args, run, optimizer, scaler, where):
    """Gradients of one step, clipped, applied -> (metrics, fp16 retries). A NaN loss stops the
    run before the weights change; an fp16 overflow is computed again at half the loss scale."""
    for overflows in range(MAX_OVERFLOWS):
        record = accumulate_gradients(model, ref_unet, pipe, scheduler, data, args, run, scaler)
        if not math.isfinite(record["loss"]):  # before the optimizer step: weights stay good
            kept = run.checkpoint_path(where[0]) or f"none of {where[0]} yet (the stage before is saved)"
            raise TrainingDiverged(f"{where[0]}: step {where[1]}: the DPO loss is {record['loss']}; "
                                   f"the last good checkpoint is kept: {kept}")
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(denoiser(pipe).parameters(), 1.0)  # Diffusion-DPO official: clip at 1
        scaler.step(optimizer)  # skipped when fp16 gradients overflowed...
        scaler.update()         # ...which halves the scale
        optimizer.zero_grad(set_to_none=True)
        if scaler.get_scale() >= scale:  # the step was taken
            return record, overflows
    raise TrainingDiverged(f"{where[0]}: step {where[1]}: fp16 gradients overflowed "
                           f"{MAX_OVERFLOWS} times in a row")


def reward_reference(args, run, judge_base, i, unet):
    """Eq. 8's reference when eps^i judges (our choice, SPEC 2c): the base model, or with
    --reward-ref prev the model round i started from (round i's DPO reference)."""
    if args.reward_ref == "base" or i == 0:
        return judge_base
    if args.lora_rank:  # eps^{i-1}: the network with rounds 0..i-1 on, round i off
        return Rounds(unet, [f"iter_{j}" for j in range(i)])
    return frozen_copy(saved_model(run.out, f"iter_{i - 1}", unet), args.reward_precision)


def begin_round(pipe, args, stage, base=None):
    """A DPO round starts from the current model: returns Eq. DPO's reference, that model, frozen
    on the device (step 0: `base`). LoRA: fresh adapters train on top of the earlier rounds', and
    the reference is the network with them off, the same model without a copy (plumbing.py)."""
    if args.lora_rank:
        return begin_lora_round(denoiser(pipe), args, stage)
    return (frozen_copy(denoiser(pipe), args.precision) if base is None else base).to(pipe.device)


def diffusion_dpo(pipe, ref_unet, pairs, args, stage, run, loss_scale=2.0 ** 16):
    """Train the pipeline's denoiser (theta) with Eq. DPO against the frozen ref_unet; returns mean metrics.

    Each process takes its slice of every global batch of --effective-batch pairs, in micro-batches;
    gradients accumulate over micro-batches and are averaged over processes (DDP). A stage with a
    checkpoint continues from it. fp16: `loss_scale` carries the last stage's scale.
    """
    unet = denoiser(pipe)
    scheduler = training_schedule(pipe)
    steps = args.dpo_steps or math.ceil(len(pairs) / args.effective_batch)
    # the official 500 warm-up steps are a quarter of its 2000: a shorter stage warms up over
    # a quarter of its own steps (our choice; SAIL's stages are 300-600 steps at the paper's size)
    warmup = min(args.warmup_steps, steps // 4)
    latent_shape = latent_shape_of(pipe, args.resolution)                       # (C, h, w)
    if not args.lora_rank:  # LoRA: only the adapters begin_round added train
        unet.requires_grad_(True)
    trained = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(list(trained.values()), args)
    scaler = torch.amp.GradScaler(pipe.device.type, init_scale=loss_scale,
                                  enabled=args.precision == "fp16")  # fp16 gradients underflow
    history, start = [], 0
    checkpoint = run.load_checkpoint(stage)
    if checkpoint:  # resume: weights, optimizer state and metrics as they were after that step
        unet.load_state_dict({**unet.state_dict(), **checkpoint["unet"]})
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, start = checkpoint["history"], checkpoint["step"]
    unet.train()
    model = (torch.nn.parallel.DistributedDataParallel(unet) if run.world > 1 else unet)
    for step in run.progress(iterable=range(start, steps), initial=start, total=steps,
                             desc=f"{stage}: Diffusion-DPO"):
        data = dpo_step_data(pairs, step, args, stage, latent_shape, scheduler)
        # Diffusion-DPO official: constant_with_warmup, a linear ramp (theirs takes its first step
        # at lr 0; ours at lr / (warmup + 1), one step ahead)
        lr = args.lr * min(1.0, (step + 1) / (warmup + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        record, overflows = optimizer_step(model, ref_unet, pipe, scheduler, data, args, run,
                                           optimizer, scaler, (stage, step + 1))
        if scaler.is_enabled():
            record.update(overflows=overflows, loss_scale=scaler.get_scale())
        run.log({"stage": stage, "step": step + 1, **record, "lr": lr})
        history.append(record)
        stop = run.stop_asked()
        if (step + 1) % args.checkpoint_every == 0 or stop:
            run.save_checkpoint(stage, {"step": step + 1, "unet": trained,  # LoRA: adapters only
                                        "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "history": history})
        if stop:
            raise Interrupted(f"{stage}: after DPO step {step + 1} of {steps}")
    unet.eval().requires_grad_(False)
    summary = {name: sum(h[name] for h in history) / len(history) for name in history[0]}
    if scaler.is_enabled():  # totals, not means; the scale the next stage starts from
        summary.update(overflows=sum(h["overflows"] for h in history), loss_scale=scaler.get_scale())
    return summary


# =================================================================================================
# 10. Self-labelling in rounds: progress saved, work split over processes
# =================================================================================================

def self_label(pipe, judge_ref, prompts, first_index, args, run, stage):
    """(self-labelled pairs with rewards and confidence, ties, tiny-world controls): judge_candidates
    over every prompt in rounds of `per_call` prompts per process; process 0 saves the pairs and
    the progress (labelling.json) after each round, so a killed run resumes from the last round."""
    folder = run.out / stage
    (folder / "pairs").mkdir(parents=True, exist_ok=True)
    progress_file = folder / "labelling.json"
    progress = (json.loads(progress_file.read_text()) if progress_file.exists()
                else {"prompts_done": 0, "ties": 0, "pairs": []})
    per_call = max(1, args.generation_batch // args.n_candidates)  # prompts per pipeline call
    bar = run.progress(total=len(prompts), initial=progress["prompts_done"],
                       desc=f"{stage}: generate + rank")
    for start in range(progress["prompts_done"], len(prompts), per_call * run.world):
        mine = range(start + run.rank * per_call, min(start + (run.rank + 1) * per_call, len(prompts)))
        found = (judge_candidates(pipe, judge_ref, [prompts[j] for j in mine],
                                  [first_index + j for j in mine], args, stage) if mine else [])
        done = min(start + per_call * run.world, len(prompts))
        for prompt, result in zip(prompts[start:done], run.gather(found)):  # in prompt order
            if result is None:
                progress["ties"] += 1
                continue
            latents, images, r_w, r_l, confidence, noises = result
            pair = {"prompt": prompt}
            for key, latent, image, noise in zip(("chosen", "rejected"), latents, images, noises):
                name = f"pairs/{len(progress['pairs']):05d}_{key}"
                pair.update({key: name + ".png", f"{key}_latents": name + ".pt"})
                if args.pair_noise == "prior":  # PNAPO's sextuple: each image with its noise
                    pair[f"{key}_noise"] = name + "_noise.pt"
                if run.main:  # the PNG is for people; the latents (C, h, w) are what trains
                    save_image(image, folder / pair[key])
                    for file, tensor in ((f"{key}_latents", latent), (f"{key}_noise", noise)):
                        if file in pair:
                            torch.save(tensor.clone(), folder / pair[file])
            progress["pairs"].append({**pair, "reward_chosen": r_w, "reward_rejected": r_l,
                                      "confidence": confidence})
        progress["prompts_done"] = done
        run.write_json(progress_file, progress)
        bar.update(done - start)
        if run.stop_asked():
            raise Interrupted(f"{stage}: after {done} of {len(prompts)} prompts")
    bar.close()
    run.barrier()  # the pairs' latents are on disk before any process trains on them
    pairs = [pair_paths(pair, lambda name: str(folder / name)) for pair in progress["pairs"]]
    pairs, extra = (tiny_world.controls(pairs, args.oracle_labels) if args.tiny  # hidden from
                    else (pairs, {}))  # SAIL: the annotator's agreement with it, --oracle-labels
    return pairs, progress["ties"], extra


# =================================================================================================
# 11. Measuring a stage: its grid, its scores, its judge; then it is saved as finished
# =================================================================================================

def evaluate(pipe, args, folder, eval_prompts):
    """Sample the fixed evaluation prompts with fixed seeds, save a grid; score them in the tiny
    world with the hidden annotator (never seen by SAIL)."""
    generators = [seeded(args.seed, "evaluation", i)  # the same noise at every stage
                  for i in range(len(eval_prompts) * args.eval_seeds)]
    latents = generate(pipe, eval_prompts, args.eval_seeds, args, generators)
    images = decode_latents(pipe.vae, latents)                 # (E*S, 3, H, W)
    save_grid(images, args.eval_seeds, folder / "grid.png")
    if not args.tiny:
        return {}
    scores = tiny_world.sample_scores(images.cpu(), [p for p in eval_prompts for _ in range(args.eval_seeds)])
    return {name: per_image.mean().item() for name, per_image in scores.items()}


def judge_agreement(pipe, judge_ref, heldout, args):
    """judge_acc/heldout: how often the model's own Eq. 8 reward prefers the human winner.

    Per held-out human pair: 1 if r(y, x_w) > r(y, x_l), 1/2 on a tie (Eq. 9 gives 0.5), else 0;
    chance is 0.5. Images are encoded to their posterior means, and every stage judges with the
    same K draws: stages are compared on the same numbers, and swapping a pair's winner and loser
    turns a score s into 1 - s. Its fall is the alarm for self-labelling collapse.
    """
    scheduler = training_schedule(pipe)
    latent_shape = latent_shape_of(pipe, args.resolution)                       # (C, h, w)
    per_call = max(1, args.reward_batch // (2 * args.k_draws))  # pairs per batch of UNet calls
    scores = []
    for start in range(0, len(heldout), per_call):
        pairs = heldout[start:start + per_call]
        means = torch.zeros((2, len(pairs), *latent_shape))  # posterior noise 0: the means
        x0 = training_latents(pipe, pairs, means, Posteriors(pipe.vae, args.resolution))  # (2P,C,h,w)
        cond = encode_text(pipe, [pair["prompt"] for pair in pairs] * 2, args)
        with judging(pipe, args):  # in --reward-precision
            rewards = implicit_reward(denoiser(pipe), judge_ref, x0, cond, scheduler, args.beta,
                                      args.k_draws, seeded(args.seed, "heldout"),
                                      args.reward_batch)                         # (2P,)
        r_w, r_l = rewards.chunk(2)                                              # (P,), (P,)
        scores += torch.where(torch.isclose(r_w, r_l), 0.5, (r_w > r_l).float()).tolist()
    return sum(scores) / len(scores)



def finish_stage(pipe, args, run, data, stage, started, summary, judge_base):
    """Save the stage's UNet, measure it (held-out judge, grid, tiny-world scores), log it and
    write summary.json last: from then on the stage counts as finished."""
    if run.main:
        folder = run.out / stage
        folder.mkdir(exist_ok=True)
        if stage != "base":
            save_model(pipe, args, folder, stage)
            if data["heldout"]:  # eps^i judges with the reference of the round that trained it
                judge_ref = reward_reference(args, run, judge_base, run.stages.index(stage) - 1,
                                             denoiser(pipe))
                summary.update({"judge_acc/heldout": judge_agreement(
                    pipe, judge_ref.to(pipe.device), data["heldout"], args),
                    "heldout_pairs": len(data["heldout"])})
                judge_ref.to("cpu")
        summary.update(evaluate(pipe, args, folder, data["eval_prompts"]))
        summary["seconds"] = round(time.time() - started, 1)
        run.log({"stage": stage, "event": "summary", **summary})
        run.write_json(folder / "summary.json", summary)  # last: the stage is finished
        run.drop_checkpoints(stage)  # the saved UNet makes them redundant
        print(" | ".join([stage] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in summary.items()]), flush=True)
    run.barrier()


# =================================================================================================
# 12. The command line and main
# =================================================================================================

# The tiny world overrides what a 1M-parameter model on 16x16 images needs; the rest is the paper's.
# lr: 1e-8 x batch gives 1.6e-7 here, far too small (SPEC section 4). CFG 4: the base draws the
# prompt right 65% of the time, 52% at CFG 2. No warm-up: it lowered the end score on 3 of 3 seeds.
TINY_PRESET = dict(resolution=16, sampler="ddim", sample_steps=10, guidance_scale=4.0,
                   effective_batch=16, micro_batch=16, lr=3e-5, dpo_steps=40, prompts_per_iter=18,
                   generation_batch=144, checkpoint_every=10, warmup_steps=0,
                   cache_posteriors=False,  # its numbers bit for bit (plumbing.Posteriors)
                   seed_pairs=str(tiny_world.SEED_PAIRS), prompts=str(tiny_world.PROMPTS_FILE),
                   heldout_pairs=str(tiny_world.HELDOUT_PAIRS))
# SDXL: the paper's SDXL settings (SPEC section 3): 2 iterations, Adafactor, DDIM 20 steps, CFG 5.
SDXL_PRESET = dict(iters=2, resolution=1024, sampler="ddim", sample_steps=20, guidance_scale=5.0,
                   optimizer="adafactor", warmup_steps=200)
# SD3 / SD3.5 and FLUX.1 (beyond the paper): 28 flow-matching Euler steps at CFG 7 (SD3) or
# guidance 3.5 (FLUX), their diffusers pipelines' defaults, at native 1024 px; beta 300 (velocity
# errors saturate the sigmoid at 5000: results/flow-beta/); the rest as the paper's SDXL. FLUX.1-dev
# is guidance-distilled: no CFG, so no empty prompts in training. Nothing here ran on real weights.
SD3_PRESET = {**SDXL_PRESET, "sampler": "euler", "sample_steps": 28, "guidance_scale": 7.0, "beta": 300.0}
FLUX_PRESET = {**SD3_PRESET, "guidance_scale": 3.5, "cfg_dropout": 0.0}
# The pipeline classes sail.py knows, each with its preset; see encode_text for how they differ.
PRESETS = {"StableDiffusionPipeline": {}, "StableDiffusionXLPipeline": SDXL_PRESET,
           "StableDiffusion3Pipeline": SD3_PRESET, "FluxPipeline": FLUX_PRESET}


def parse_args(argv, world=1):
    """Parse the command line: the world (tiny, SD, SDXL, or the resumed run) decides the defaults
    that flags override and --help shows; then the derived values, then the checks."""
    names = list(Args.__dataclass_fields__)
    first = parse_flags(flag_parser(Args, {}, ""), [a for a in argv if a not in ("-h", "--help")])
    explicit_model = any(a == "--model" or a.startswith("--model=") for a in argv)
    if first["resume"]:  # a resumed run takes every setting from its config.json
        defaults, shown = absolute_paths(saved_settings(first["resume"], names)), "the resumed run"
    elif first["tiny"] or not (explicit_model or torch.cuda.is_available()):
        defaults = {**TINY_PRESET, **tiny_world.PRESETS[first["tiny_model"]], "tiny": True}
        shown = "the tiny world (--tiny, or no GPU found)"
    else:
        defaults, shown = PRESETS[pipeline_class(first["model"], PRESETS)], f"--model {first['model']}"
    if first["lora_rank"] and not first["resume"]:  # adapters start at 0: another lr
        defaults = {**defaults, "lr": LORA_LR["tiny" if defaults.get("tiny") else "real"]}
    description = f"{__doc__.splitlines()[0]} Defaults shown: {shown}."
    args = Args(**parse_flags(flag_parser(Args, defaults, description), argv))
    if args.resume:
        refuse_changes(args, defaults)  # flags given again must agree with config.json
        args.out = args.resume
    # Derived values, filled in once here so every later line reads them from args.
    if args.lr is None:
        args.lr = 1e-8 * args.effective_batch  # Diffusion-DPO: 1e-8 x effective batch
    args.precision = args.precision or default_precision()
    check_settings(args, world)
    return args


def start_run(argv, rank, world, device, say):
    """Every check that can fail on user input, before anything is written -> (data, run, pipe)."""
    args = parse_args(argv, world)
    say(opening_line(args, argv, device))  # which world this run is in, and why
    data = read_data(args, world)
    run = Run(run_folder(args, world), args, rank, world, device)
    if not args.resume:
        check_new_folder(run.out)
    pipe = load_pipeline(base_model(args, run), device)
    check_model(pipe, args)
    check_disk_space(run.out, denoiser(pipe), args)
    if args.cache_posteriors:  # the seed pairs' VAE posteriors, encoded once a run
        run.posteriors = kept_posteriors(pipe.vae, data["seed_pairs"], args)
    return args, data, run, pipe


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    rank, world, device = setup_processes()
    say = print if rank == 0 else (lambda *_, **__: None)  # one voice for all processes
    try:
        args, data, run, pipe = start_run(argv, rank, world, device, say)
    except InputError as error:
        say(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if run.main and not args.resume:
        write_config(args, run)
    run.barrier()
    cast_frozen_models(pipe, args.precision, lora=args.lora_rank)
    if args.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
    say(f"{'resuming' if args.resume else 'writing to'} {run.out}; reward reference: "
        f"{args.reward_ref}; lr {args.lr:.3g}; N={args.n_candidates} K={args.k_draws} "
        f"beta={args.beta:g} alpha={args.mix_alpha:g}; {args.precision} (Eq. 8 in "
        f"{args.reward_precision}); {data['heldout_note']}; "
        f"{world} process(es)", flush=True)
    run.open_log()
    try:
        with run.stoppable():
            sail(args, pipe, data, run)
    except (Interrupted, KeyboardInterrupt) as stopped:
        say(f"stopped{f': {stopped}' if str(stopped) else ''}; the last saved progress is kept; "
            f"continue with: python sail.py --resume {run.out}", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        say(f"error: {error}; lower --lr or use --precision fp32", file=sys.stderr)
        return 3
    except OSError as error:  # disk full, folder removed...: progress up to the last save is kept
        say(f"error: writing {run.out} failed: {error}; fix it, then: python sail.py --resume "
            f"{run.out}", file=sys.stderr)
        return 1
    if run.stop:  # asked after the last stage's last safe point: it finished instead (exit 0)
        say("the stop came after the last step: the run finished, every stage is saved")
    say(f"done in {time.time() - started:.0f} s: {run.out}")
    return 0


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
