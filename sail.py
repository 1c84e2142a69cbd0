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
    Eq. DPO  Diffusion-DPO loss -log sigma(-(beta/2)[...])                  denoising_error, dpo_loss
    Eq. 8    implicit reward r(y, x) = -(beta/2) mean_k[err_theta - err_ref] implicit_reward
    Eq. 9    preference p(A > B) = sigma(r_A - r_B); best-worst pair        preference_probability, best_worst_pair
    mixup    ranked preference mixup, ratio alpha                            ranked_mixup

Run it:

    python sail.py --iters 2              # GPU: Stable Diffusion 1.5 on a Pick-a-Pic v2 subset
                                          # (needs `datasets`); no GPU: the embedded tiny world
    python sail.py --tiny --iters 2       # the tiny world anywhere (2 CPU cores: ~30 s, plus ~2.5
                                          # min once to pretrain and cache the tiny base model)
    python sail.py --model ./my-sd15 ...  # any local diffusers folder or hub id
    python sail.py --resume runs/sd-...   # continue a killed or Ctrl-C'd run where it stopped
    torchrun --nproc_per_node=8 sail.py   # 8 GPUs: generation, ranking and DPO split 8 ways
    python sail.py --help                 # every setting with its paper value

Sections, in the order a run executes them: 1 settings, 2 loading models, 3 the tiny world
(plumbing a real-SD reader can skip), 4 data, 5 the run folder (resume, torchrun; plumbing),
6 Diffusion-DPO loss, 7 implicit reward, 8 self-labelling, 9 ranked mixup, 10 training,
11 the SAIL loop, 12 main.
"""

import os

# Quiet by default: silence library chatter a user cannot act on (missing torchvision/accelerate
# notes, load progress bars) before the libraries are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import contextlib
import copy
import datetime
import difflib
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, HfArgumentParser

diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()  # also when diffusers was imported before sail
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
# DDP notes that a 1x1 convolution's gradient has another memory layout than its bucket: harmless
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


HERE = Path(__file__).resolve().parent  # the shipped seed_pairs.json and prompts.txt live here


class InputError(Exception):
    """Bad input from the user: main() prints it on one line and exits with code 2."""


# =================================================================================================
# 1. Settings
# =================================================================================================

@dataclass
class Args:
    # --- what to align, and where to write
    model: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata={
        "help": "base model: a hub id or a local diffusers folder (paper: SD 1.5 and SDXL)"})
    tiny: bool = field(default=False, metadata={
        "help": "run the embedded tiny world (the default when no GPU is found)"})
    seed_pairs: Optional[str] = field(default=None, metadata={
        "help": "human seed pairs D_init: JSON list of {prompt, chosen, rejected} (paper: ~50K "
                "Pick-a-Pic v2 pairs, 6 percent; default: the tiny world's seed_pairs.json, or "
                "for a real model a fixed subset of --pickapic-dataset)"})
    prompts: Optional[str] = field(default=None, metadata={
        "help": "new prompts, one per line; iteration i takes the i-th disjoint slice (default: "
                "the tiny world's prompts.txt, or for a real model other Pick-a-Pic captions)"})
    heldout_pairs: Optional[str] = field(default=None, metadata={
        "help": "human pairs never trained on, to measure after every stage how often the "
                "model's own reward agrees with people (judge_acc/heldout; default: the tiny "
                "world's heldout_pairs.json, else a fixed 5 percent of the seed pairs, at most "
                "500; 'none' to skip)"})
    pickapic_dataset: str = field(default="yuvalkirstain/pickapic_v2", metadata={
        "help": "real models without --seed-pairs/--prompts: the Pick-a-Pic v2 source of the "
                "default data, a hub name (streamed once, then cached) or a save_to_disk folder"})
    out: Optional[str] = field(default=None, metadata={
        "help": "output folder, must not exist yet (default: runs/<world>-<time>)"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    # --- SAIL (SPEC section 3)
    iters: int = field(default=3, metadata={
        "help": "SAIL iterations after step 0 (paper: 3 for SD 1.5, 2 for SDXL)"})
    prompts_per_iter: Optional[int] = field(default=None, metadata={
        "help": "new prompts per iteration (paper: 10K, 20K, 20K; default: prompts file split "
                "evenly over the iterations)"})
    n_candidates: int = field(default=8, metadata={"help": "N, images per prompt (paper: 8)"})
    k_draws: int = field(default=10, metadata={
        "help": "K, (t, noise) draws of the implicit reward, Eq. 8 (paper: 10)"})
    beta: float = field(default=5000.0, metadata={
        "help": "beta of Eq. DPO and Eq. 8 (paper: 5000)"})
    mix_alpha: float = field(default=0.25, metadata={
        "help": "alpha, fraction of self-labelled pairs in each mixed set (paper: 0.25; 1 = no "
                "mixup)"})
    keep_top: float = field(default=1.0, metadata={
        "help": "keep this top fraction of self-labelled pairs, ranked by confidence (our choice)"})
    pairs: Literal["best-worst", "random", "none"] = field(default="best-worst", metadata={
        "help": "which candidates form a pair (paper: best-worst; random is its ablation; none is "
                "the control 'iterative seed-only DPO': no self-labelling, seed pairs each round)"})
    reward_ref: Literal["base", "prev"] = field(default="base", metadata={
        "help": "reference of the implicit reward: the base model, or the previous round's DPO "
                "reference (our choice, SPEC 2c)"})
    # --- Diffusion-DPO training
    effective_batch: int = field(default=128, metadata={
        "help": "pairs per optimizer step (paper: 128)"})
    micro_batch: int = field(default=8, metadata={
        "help": "pairs per forward pass; gradients accumulate up to --effective-batch"})
    optimizer: Literal["adamw", "adafactor"] = field(default="adamw", metadata={
        "help": "optimizer (paper: AdamW for SD 1.5, Adafactor for SDXL)"})
    lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate (default: 1e-8 x effective batch, the Diffusion-DPO rule)"})
    dpo_steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps per DPO stage (default: one pass over the stage's pairs)"})
    warmup_steps: int = field(default=500, metadata={
        "help": "linear learning-rate warm-up at the start of every DPO stage (Diffusion-DPO "
                "official: constant_with_warmup, 500 steps for SD 1.5, 200 for SDXL)"})
    cfg_dropout: float = field(default=0.2, metadata={
        "help": "fraction of training prompts replaced by '' so CFG keeps working (Diffusion-DPO: "
                "0.2)"})
    # --- sampling candidates
    resolution: int = field(default=512, metadata={"help": "image size in pixels (SD 1.5: 512)"})
    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata={
        "help": "sampler for candidates (paper: DDPM for SD 1.5, DDIM for SDXL)"})
    sample_steps: int = field(default=50, metadata={"help": "denoising steps (paper: 50)"})
    guidance_scale: float = field(default=7.5, metadata={"help": "CFG scale (paper: 7.5)"})
    generation_batch: int = field(default=64, metadata={"help": "images per pipeline call"})
    reward_batch: int = field(default=80, metadata={
        "help": "noisy latents per UNet call of the implicit reward"})
    # --- tiny world
    pretrain_steps: int = field(default=1200, metadata={
        "help": "tiny world only: pretraining steps of the tiny base's autoencoder and UNet "
                "(about 2.5 min on 2 CPU cores, once: the result is cached)"})
    oracle_labels: bool = field(default=False, metadata={
        "help": "tiny world only, a control: the hidden annotator re-labels each self-labelled "
                "pair ('all-labels DPO', the paper's full-human-data reference)"})
    make_seed_pairs: bool = field(default=False, metadata={
        "help": "tiny world only: write the tiny world's seed pairs to --seed-pairs and exit"})
    # --- a long job: resume, memory (plumbing; none of these changes the algorithm)
    resume: Optional[str] = field(default=None, metadata={
        "help": "continue the interrupted run in this folder where it stopped (its config.json "
                "holds every setting; a flag given again must agree with it)"})
    checkpoint_every: int = field(default=50, metadata={
        "help": "write a training checkpoint every this many DPO steps (generation saves its "
                "progress after every batch of prompts)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest this many checkpoints"})
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = field(default=None, metadata={
        "help": "dtype of the frozen models (reference UNets, VAE, text encoders) and of autocast "
                "while the trained UNet (fp32 weights) runs (default: bf16 on a GPU that has it, "
                "else fp32)"})
    reward_precision: Literal["fp32", "fp16", "bf16"] = field(default="fp32", metadata={
        "help": "precision of Eq. 8's UNet forwards and of its frozen reference, whatever "
                "--precision is: Eq. 8 multiplies a difference of differences of errors by "
                "beta/2 = 2500, so rounding shows there first (README: measured per precision; "
                "fp16 ranks 4x faster, close to fp32 once a stage has moved the model)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the trained UNet's activations in the backward pass: less memory, "
                "one more UNet forward per DPO micro-batch"})


# The tiny world overrides what a 1M-parameter model on 16x16 images needs; everything else keeps
# the paper's value. lr: the 1e-8 x batch rule gives 1.6e-7 here, far too small for a tiny model;
# 3e-5 trained and >= 1e-4 over-optimised in our measurements (SPEC section 4). CFG 4: the base
# draws the prompted colour and shape in 65% of samples at CFG 4, 52% at CFG 2 (DDIM 10 steps).
# No warm-up: a ramp over a quarter of a 40-step stage lowered the end score on 3 of 3 seeds (README).
TINY_PRESET = dict(resolution=16, sampler="ddim", sample_steps=10, guidance_scale=4.0,
                   effective_batch=16, micro_batch=16, lr=3e-5, dpo_steps=40, prompts_per_iter=18,
                   generation_batch=144, checkpoint_every=10, warmup_steps=0,
                   seed_pairs=str(HERE / "seed_pairs.json"), prompts=str(HERE / "prompts.txt"),
                   heldout_pairs=str(HERE / "heldout_pairs.json"))


# SDXL: the paper's SDXL settings (SPEC section 3): 2 iterations, Adafactor, DDIM 20 steps, CFG 5.
SDXL_PRESET = dict(iters=2, resolution=1024, sampler="ddim", sample_steps=20, guidance_scale=5.0,
                   optimizer="adafactor", warmup_steps=200)
# The pipeline classes sail.py knows, each with its preset; see encode_text for how they differ.
PRESETS = {"StableDiffusionPipeline": {}, "StableDiffusionXLPipeline": SDXL_PRESET}


def cannot_load(model, error):
    """Offline, missing folder, not a pipeline: all the same to a user, one line naming --tiny."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"could not load --model {model}: {reason} "
                      "(no network or weights? run with --tiny for the embedded tiny world)")


def pipeline_class(model):
    """The pipeline class a hub id or folder declares (model_index.json), before loading weights."""
    try:
        name = DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as error:
        raise cannot_load(model, error)
    if name not in PRESETS:
        raise InputError(f"--model {model}: pipeline class {name} is not supported "
                         f"(supported: {', '.join(PRESETS)})")
    return name


def read_run_config(folder):
    """The settings a run folder was started with (its config.json), for --resume."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"--resume {folder}: not a sail.py run folder ({path}: {error})")
    missing = [name for name in Args.__dataclass_fields__ if name not in config]
    if missing:
        raise InputError(f"--resume {folder}: {path} lacks {', '.join(missing)}: not a run "
                         "of this sail.py")
    return {name: config[name] for name in Args.__dataclass_fields__ if name != "out"}


# Flags a resumed run may change: they decide how the work is split and saved, not what it computes.
RESUME_MAY_CHANGE = ("resume", "checkpoint_every", "keep_checkpoints", "micro_batch",
                     "generation_batch", "reward_batch")


def parse_known_flags(parser, argv):
    """argv -> Args; an unknown flag is bad input (one line naming the closest known flag)."""
    args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        known = [name for name in parser._option_string_actions if "_" not in name]
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
        raise InputError(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
                         + "; python sail.py --help lists every flag")
    return args


PATHS = ("seed_pairs", "prompts", "heldout_pairs", "model")  # stored absolute: --resume from anywhere


def absolute_paths(settings):
    """The path settings that exist, made absolute: config.json then works from any folder."""
    for name in PATHS:
        value = settings[name]
        if value and value != "none" and Path(value).exists():
            settings[name] = str(Path(value).absolute())
    return settings


def parse_args(argv):
    """Parse the command line; the world (tiny, SD or SDXL) decides the defaults, then validate."""
    explicit_model = any(a == "--model" or a.startswith("--model=") for a in argv)
    parser = HfArgumentParser(Args)
    args = parse_known_flags(parser, argv)
    if args.resume:
        # A resumed run takes every setting from its config.json; flags given again must agree.
        saved = absolute_paths(read_run_config(args.resume))
        parser.set_defaults(**saved)
        args = Args(**absolute_paths(asdict(parse_known_flags(parser, argv))))
        changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {saved[name]})"
                   for name in saved if name not in RESUME_MAY_CHANGE
                   and getattr(args, name) != saved[name]]
        if changed or (args.out and Path(args.out) != Path(args.resume)):
            raise InputError(f"--resume {args.resume}: a resumed run keeps its settings: "
                             + "; ".join(changed or [f"--out {args.out}"]))
        args.out = args.resume
    else:
        if not args.tiny and not explicit_model and not torch.cuda.is_available():
            args.tiny = True  # no GPU and no model asked for: the embedded tiny world
        # Parse again with the world's preset as defaults: flags given on the command line win.
        parser.set_defaults(**(TINY_PRESET if args.tiny else PRESETS[pipeline_class(args.model)]),
                            tiny=args.tiny)
        args = Args(**absolute_paths(asdict(parse_known_flags(parser, argv))))
    # Derived values, filled in once here so every later line reads them from args.
    if args.lr is None:
        args.lr = 1e-8 * args.effective_batch  # Diffusion-DPO: 1e-8 x effective batch
    args.precision = args.precision or default_precision()
    checks = [
        (args.iters >= 0, "--iters must be >= 0"),
        (args.n_candidates >= 2, "--n-candidates (N) must be >= 2 to form a pair"),
        (args.k_draws >= 1, "--k-draws (K) must be >= 1"),
        (0 < args.mix_alpha <= 1, "--mix-alpha must be in (0, 1]"),
        (0 < args.keep_top <= 1, "--keep-top must be in (0, 1]"),
        (args.beta > 0, "--beta must be > 0"),
        (args.lr > 0, "--lr must be > 0"),
        (args.micro_batch >= 1 and args.effective_batch % args.micro_batch == 0,
         "--effective-batch must be a multiple of --micro-batch (>= 1)"),
        (args.dpo_steps is None or args.dpo_steps >= 1, "--dpo-steps must be >= 1"),
        (args.prompts_per_iter is None or args.prompts_per_iter >= 1,
         "--prompts-per-iter must be >= 1"),
        (0 <= args.cfg_dropout < 1, "--cfg-dropout must be in [0, 1)"),
        (args.resolution >= 8 and args.resolution % 8 == 0, "--resolution must be a multiple of 8"),
        (args.sample_steps >= 1, "--sample-steps must be >= 1"),
        (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (args.generation_batch >= 1 and args.reward_batch >= 1, "batch sizes must be >= 1"),
        (args.pretrain_steps >= 1, "--pretrain-steps must be >= 1"),
        (args.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
        (args.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
        (args.tiny or not args.oracle_labels, "--oracle-labels needs the tiny world's annotator"),
        (args.tiny or not args.make_seed_pairs, "--make-seed-pairs writes the tiny world's pairs: "
                                                "add --tiny"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    return args


# =================================================================================================
# 2. Loading models                                                              (plumbing)
# =================================================================================================
# Real SD and the tiny world go through these same lines: the tiny base is a diffusers folder too.

def load_pipeline(model, device):
    """A diffusers text-to-image pipeline (SD or SDXL) from a hub id or local folder, all frozen."""
    try:
        pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                 requires_safety_checker=False)
    except Exception as error:
        raise cannot_load(model, error)
    return prepare_pipeline(pipe, device)


def prepare_pipeline(pipe, device):
    """Quiet, on the device, every part frozen (training unfreezes the UNet it trains)."""
    pipe.set_progress_bar_config(disable=True)  # we keep one bar per stage ourselves
    pipe.to(device)
    for part in pipe.components.values():  # text encoders, VAE, UNet
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    return pipe


def encode_text(pipe, prompts, resolution):
    """Prompts -> the UNet's conditioning kwargs. The one place where SD and SDXL differ.

    pipe.encode_prompt is the pipeline's own text path, so training conditions exactly as
    sampling does. SD 1.5: {"encoder_hidden_states": (B, 77, 768)}. SDXL adds a pooled text
    embedding and "micro-conditioning" time ids; its hidden states are both text encoders'
    penultimate layers concatenated, (B, 77, 2048).
    """
    if isinstance(pipe, StableDiffusionXLPipeline):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device,
                                                  do_classifier_free_guidance=False)
        # time ids = (original h, w, crop top, crop left, target h, w): we train and sample
        # uncropped at one resolution (our choice; the pipeline samples with the same ids)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                dtype=hidden.dtype, device=pipe.device).repeat(len(prompts), 1)  # (B, 6)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    hidden, _ = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return {"encoder_hidden_states": hidden}                                    # (B, L, D)


def map_cond(fn, cond):
    """Apply fn to every tensor of a conditioning dict (nested for SDXL): repeat, slice, concat."""
    return {name: map_cond(fn, value) if isinstance(value, dict) else fn(value)
            for name, value in cond.items()}


def encode_images(vae, images, noise):
    """Images (B, 3, H, W) in [-1, 1] -> latents x_0 (B, 4, H/f, W/f), scaled as the UNet expects.

    x_0 is a sample of the VAE's posterior, mean + std * noise: latent_dist.sample() of the
    Diffusion-DPO official code, with the (B, 4, h, w) noise passed in so that a resumed run and
    every process of a multi-GPU run draw the same one.
    """
    with torch.no_grad():
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        x0 = posterior.mean.float() + posterior.std.float() * noise.to(images.device)
    return x0 * vae.config.scaling_factor


def decode_latents(vae, latents):
    """Latents (B, 4, h, w) -> images (B, 3, H, W) in [0, 1], float32."""
    with torch.no_grad():
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample  # in [-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# Memory: one GPU must be enough for SD 1.5. Frozen models -- the reference UNets, the VAE and the
# text encoders -- are stored in --precision; the trained UNet keeps fp32 weights (AdamW updates of
# lr x grad are far below bf16's resolution) and its forward passes run under autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision():
    """bf16 on a GPU that has it (A100, H100, RTX 30xx and later), else fp32."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def cast_frozen_models(pipe, precision):
    """Text encoders and VAE to `precision`; a VAE whose config asks to stay fp32 (force_upcast:
    SD's and SDXL's VAEs overflow in fp16) stays fp32 in fp16 runs."""
    dtype = DTYPES[precision]
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module) and name != "unet":
            upcast = name == "vae" and dtype == torch.float16 and part.config.force_upcast
            part.to(torch.float32 if upcast else dtype)


def autocast(device, precision):
    """Mixed precision for the UNets' forward passes: matmuls and convolutions in `precision`."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


# =================================================================================================
# 3. The tiny world                                    (plumbing; real-SD readers can skip it)
# =================================================================================================
# A world small enough for 2 CPU cores in which alignment can be *seen*:
# - images: one filled shape of one colour on black, 16x16 RGB, with random size, position and
#   brightness; prompts "a {colour} {shape}" (6 colours x 3 shapes = 18 prompts);
# - a Stable-Diffusion-shaped pipeline (CLIP tokenizer + text encoder, AutoencoderKL, UNet, DDPM
#   scheduler), built from configs and briefly pretrained on that world, then cached;
# - a simulated annotator, a fixed hand-written rule standing in for the human labellers: it
#   prefers bright, large, centred paint of the prompted colour. It labelled the shipped seed
#   pairs, and it scores samples after every stage so a student sees alignment as a number.
#   SAIL itself never calls it: only the seed pairs carry its labels.
# Seed pairs cover only the "seen" prompts (red/green/blue x square/circle); the other 12 are
# "unseen", so self-labelling has something to carry beyond the human data (SPEC section 4).

TINY_COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
                "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
TINY_SHAPES = ("square", "circle", "triangle")
TINY_PROMPTS = [f"a {c} {s}" for c in TINY_COLOURS for s in TINY_SHAPES]
TINY_SEEN = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("square", "circle")]
TINY_SIZE = 16           # pixels; the autoencoder halves it: latents are (4, 8, 8)
TINY_SEED_PAIRS = 64     # pairs in the shipped seed_pairs.json
TINY_HELDOUT_PAIRS = 32  # in heldout_pairs.json: judged after every stage (~1 s each, 2 cores)
TINY_VERSION = "2"       # bump when the world or the tiny configs change: invalidates the cache


def parse_tiny_prompt(prompt):
    """'a red circle' -> ('red', 'circle'); None if the tiny world cannot draw it."""
    words = prompt.split()
    if len(words) == 3 and words[0] == "a" and words[1] in TINY_COLOURS and words[2] in TINY_SHAPES:
        return words[1], words[2]
    return None


def draw_tiny_images(prompts, generator):
    """The world's image distribution: (B, 3, 16, 16) in [0, 1], one random shape per prompt."""
    b = len(prompts)
    radius = 2.5 + 3.0 * torch.rand(b, 1, 1, generator=generator)             # (B, 1, 1) pixels
    centre = 7.5 + 6.0 * (torch.rand(b, 2, 1, 1, generator=generator) - 0.5)  # (B, 2, 1, 1)
    brightness = 0.4 + 0.6 * torch.rand(b, 1, 1, 1, generator=generator)       # (B, 1, 1, 1)
    grid = torch.arange(TINY_SIZE, dtype=torch.float32)
    dy = grid.view(1, -1, 1) - centre[:, 0]                                    # (B, 16, 1)
    dx = grid.view(1, 1, -1) - centre[:, 1]                                    # (B, 1, 16)
    masks = {"square": (dx.abs() <= radius) & (dy.abs() <= radius),
             "circle": dx ** 2 + dy ** 2 <= radius ** 2,
             "triangle": (dy.abs() <= radius) & (dx.abs() <= (dy + radius) / 2)}  # each (B, 16, 16)
    colour, shape = zip(*(parse_tiny_prompt(p) for p in prompts))
    mask = torch.stack([masks[s][i] for i, s in enumerate(shape)]).float()   # (B, 16, 16)
    rgb = torch.tensor([TINY_COLOURS[c] for c in colour]).view(b, 3, 1, 1)   # (B, 3, 1, 1)
    return brightness * rgb * mask.unsqueeze(1)                              # (B, 3, 16, 16)


def annotator_score(images, prompts):
    """The simulated human: 0-100, higher for bright, large, centred paint of the prompted colour.

    score = 100 * sum_pixels w(p) * exp(-||pixel - colour||^2 / 0.2), w a centred Gaussian (sum 1).
    """
    rgb = torch.tensor([TINY_COLOURS[parse_tiny_prompt(p)[0]] for p in prompts])
    match = torch.exp(-((images - rgb.view(-1, 3, 1, 1)) ** 2).sum(1) / 0.2)  # (B, 16, 16)
    grid = torch.arange(TINY_SIZE, dtype=torch.float32) - (TINY_SIZE - 1) / 2
    weight = torch.exp(-(grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) / (2 * 4.0 ** 2))
    return 100 * (match * weight / weight.sum()).sum((1, 2))                   # (B,)


def fidelity(images, prompts):
    """Does each image still show its prompt? (B,) bool: right colour, right shape, not a blob.

    Tracked beside the annotator score, because a score far above the data's range bought with a
    screen full of paint is reward hacking, not alignment (SPEC section 4).
    """
    painted = images.amax(1) > 0.25                                             # (B, 16, 16)
    ok = []
    for image, mask, prompt in zip(images, painted, prompts):
        colour, shape = parse_tiny_prompt(prompt)
        area = int(mask.sum())
        if area < 9 or area > 0.6 * TINY_SIZE ** 2:  # the world draws 16..144 pixels (r in 2.5..5.5)
            ok.append(False)
            continue
        mean_rgb = image[:, mask].mean(1)                                       # (3,)
        names = list(TINY_COLOURS)
        palette = torch.tensor([TINY_COLOURS[c] for c in names])                # (6, 3)
        nearest_colour = names[int(F.cosine_similarity(palette, mean_rgb[None]).argmax())]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = area / float(box)  # square ~1.0, circle ~0.79, triangle ~0.5 of its bounding box
        nearest_shape = min(zip((1.0, 0.76, 0.5), TINY_SHAPES), key=lambda fs: abs(fs[0] - fill))[1]
        ok.append(nearest_colour == colour and nearest_shape == shape)
    return torch.tensor(ok)


def tiny_tokenizer(folder):
    """A word-level CLIPTokenizer for the world's words, built offline.

    BPE merges spell each word letter by letter ('r e', 're d</w>'), so every word becomes one
    token. (A CLIPTokenizer from a hub id, offline, can silently come back with 2 tokens.)
    """
    words = ["a", *TINY_COLOURS, *TINY_SHAPES]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {piece: i for i, piece in enumerate([*letters, *(l + "</w>" for l in letters)])}
    merges = []
    for word in words:
        for i in range(1, len(word)):
            left, right = word[:i], word[i] + ("</w>" if i == len(word) - 1 else "")
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
                vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def build_tiny_pipeline(folder):
    """An untrained Stable-Diffusion-shaped pipeline (about 0.9M parameters) from configs."""
    tokenizer = tiny_tokenizer(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=8, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=TINY_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=TINY_SIZE)
    # SD 1.5's noise schedule (scaled_linear 0.00085..0.012 over T = 1000 steps)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def pretrain_tiny_pipeline(pipe, steps, seed):
    """Teach the tiny pipeline its world, as SD was taught on LAION: autoencoder, then UNet."""
    generator = torch.Generator().manual_seed(seed)

    def world_batch(size):
        prompts = [TINY_PROMPTS[i] for i in torch.randint(len(TINY_PROMPTS), (size,),
                                                            generator=generator)]
        return prompts, draw_tiny_images(prompts, generator) * 2 - 1  # images in [-1, 1]

    def cosine(warmup):  # learning-rate factor: linear warm-up, then cosine decay to 0
        return lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))

    # (a) autoencoder: reconstruction + a tiny KL term (SD's VAE recipe, scaled down). Fewer or
    # slower steps left blurry reconstructions, which cap what the UNet can ever draw.
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(warmup=1))
    for _ in tqdm(range(steps), desc="tiny world: pretrain autoencoder", leave=False):
        _, images = world_batch(32)
        posterior = vae.encode(images).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    # scaling factor = 1 / std of the latents, so x_0 has unit variance (how SD chose 0.18215)
    latents = vae.encode(world_batch(512)[1]).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))

    # (b) text encoder + UNet: plain denoising loss (Eq. F with an epsilon target), 15% empty
    # prompts so classifier-free guidance works; AdamW, warm-up + cosine, clip 1. Measured (DDIM
    # 10 steps, CFG 4): the prompted colour and shape in 25% of samples after 600 steps, 65% after
    # 1200.
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=6e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(warmup=30))
    pipe.unet.train()
    pipe.text_encoder.train()
    for _ in tqdm(range(steps), desc="tiny world: pretrain base model", leave=False):
        prompts, images = world_batch(32)
        prompts = ["" if torch.rand(1, generator=generator) < 0.15 else p for p in prompts]
        # the posterior's noise from the global RNG (seeded above), as latent_dist.sample() draws it
        x0 = encode_images(vae, images, torch.randn(32, 4, 8, 8))            # (32, 4, 8, 8)
        cond = encode_text(pipe, prompts, TINY_SIZE)                          # (32, 8, 32)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (32,), generator=generator)
        loss = denoising_error(pipe.unet, pipe.scheduler, x0, noise, t, cond).mean()  # section 6
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe


def tiny_base_model(pretrain_steps, seed=0):
    """Path of the pretrained tiny base pipeline, pretraining it once (cached by its settings)."""
    key = hashlib.sha256(f"{TINY_VERSION}-{pretrain_steps}-{seed}-{torch.__version__}".encode())
    folder = cache_folder(f"tiny-base-{key.hexdigest()[:12]}")
    if not (folder / "model_index.json").exists():
        started = time.time()
        with tempfile.TemporaryDirectory() as scratch:
            torch.manual_seed(seed)  # the configs' random initialisation
            pipe = pretrain_tiny_pipeline(build_tiny_pipeline(Path(scratch)), pretrain_steps, seed)
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        pipe.save_pretrained(partial)
        partial.replace(folder)  # atomic: a killed pretraining never leaves a half-written cache
        print(f"tiny world: pretrained the base model in {time.time() - started:.0f} s, "
              f"cached in {folder}")
    return str(folder)


def annotator_agrees(pairs):
    """(P,) bool: does the hidden annotator prefer each pair's chosen image to its rejected one?"""
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = (torch.stack([load_image(p[key], TINY_SIZE) for p in pairs]) / 2 + 0.5
                        for key in ("chosen", "rejected"))                      # (P, 3, 16, 16)
    return annotator_score(chosen, prompts) > annotator_score(rejected, prompts)


def annotator_relabel(pairs):
    """The all-labels control: the same pairs, ordered by the hidden annotator instead of Eq. 8.

    A flipped pair keeps Eq. 8's rewards with their images, so its confidence becomes 1 - p.
    """
    def flipped(pair):
        swapped = dict(pair)
        for end in ("", "_latents"):  # each image keeps its latents file
            if f"chosen{end}" in pair:
                swapped[f"chosen{end}"] = pair[f"rejected{end}"]
                swapped[f"rejected{end}"] = pair[f"chosen{end}"]
        if "confidence" in pair:  # a self-labelled pair: its rewards follow their images
            swapped.update(reward_chosen=pair["reward_rejected"],
                           reward_rejected=pair["reward_chosen"],
                           confidence=1 - pair["confidence"])
        return swapped
    return [pair if agrees else flipped(pair)
            for pair, agrees in zip(pairs, annotator_agrees(pairs).tolist())]


def make_tiny_seed_pairs(path, seed):
    """Write the tiny world's human pairs: world images of the seen prompts, annotator-labelled.

    Like Pick-a-Pic, two images of the same prompt; the annotator picks the one it prefers, and
    near-ties (< 1 point apart) are dropped, as Diffusion-DPO drops tied human labels. The seed
    set goes to `path`; the pairs drawn next to heldout_pairs.json beside it: never trained on,
    they measure how often the model's own judgement agrees with the annotator.
    """
    path = Path(path)
    heldout, image_dir = path.parent / "heldout_pairs.json", path.parent / "seed_images"
    if path.exists() or heldout.exists() or image_dir.exists():
        raise InputError(f"{path}, {heldout} or {image_dir} already exists; remove them to "
                         "regenerate")
    image_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for file, prefix, count in ((path, "", TINY_SEED_PAIRS),
                                (heldout, "heldout_", TINY_HELDOUT_PAIRS)):
        pairs = []
        while len(pairs) < count:
            prompt = TINY_SEEN[len(pairs) % len(TINY_SEEN)]
            images = draw_tiny_images([prompt, prompt], generator)              # (2, 3, 16, 16)
            score = annotator_score(images, [prompt, prompt])
            if abs(score[0] - score[1]) < 1.0:
                continue
            winner = int(score.argmax())
            names = [f"seed_images/{prefix}{len(pairs):03d}_{key}.png" for key in ("chosen", "rejected")]
            save_image(images[winner], path.parent / names[0])
            save_image(images[1 - winner], path.parent / names[1])
            pairs.append({"prompt": prompt, "chosen": names[0], "rejected": names[1]})
        file.write_text(json.dumps(pairs, indent=1) + "\n")
        print(f"wrote {len(pairs)} pairs to {file} and their images to {image_dir}")


# =================================================================================================
# 4. Data: seed pairs and prompts                                                (plumbing)
# =================================================================================================

def read_seed_pairs(path):
    """seed_pairs.json -> list of {prompt, chosen, rejected} with image paths made absolute.

    Checks every entry and opens every image header now, so a bad file fails before any work.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read: {error}")
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON: {error}")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: expected a non-empty JSON list of "
                         '{"prompt", "chosen", "rejected"} objects')
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(entry.get(key), str):
                raise InputError(f"{where}: key '{key}' missing or not a string")
        pair = {"prompt": entry["prompt"]}
        for key in ("chosen", "rejected"):
            image_path = path.parent / entry[key]  # relative to the JSON file (or absolute)
            try:
                with Image.open(image_path) as image:
                    image.verify()
            except (OSError, UnidentifiedImageError) as error:
                raise InputError(f"{where}: {key} image {entry[key]} missing or unreadable: "
                                 f"{type(error).__name__}")
            pair[key] = str(image_path)
        pairs.append(pair)
    return pairs


def read_prompts(path):
    """prompts.txt -> list of prompts; blank lines and '#' comments are skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read: {error}")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{path}: no prompts (only blank lines or # comments)")
    return prompts


def load_image(path, resolution):
    """Image file -> (3, R, R) tensor in [-1, 1]: resize the short side, centre-crop."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)),
                              max(resolution, round(image.height * scale))), Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1


def to_pil(image):
    """(3, H, W) tensor in [0, 1] -> PIL image."""
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


def save_image(image, path):
    """(3, H, W) tensor in [0, 1] -> PNG file."""
    to_pil(image).save(path)


# =================================================================================================
# 5. The run: randomness, files, resume, processes                               (plumbing)
# =================================================================================================
# A paper-sized run takes hours: it must survive a kill, and may be spread over GPUs (torchrun).
# Three rules make both exact rather than approximate:
#   1. every random draw comes from a generator seeded by what it is for (`seeded`): candidate c
#      of prompt j, step s of a DPO stage. No draw depends on what ran before it, in this process
#      or another, so resuming or splitting the work never changes a number;
#   2. every state file is written whole or not at all (a temporary name, then a rename);
#   3. only process 0 writes; the others wait for it where they read what it wrote.

def seeded(seed, *keys):
    """The generator of one unit of work, e.g. seeded(0, "iter_1", "candidate", 17, 3)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run saved its progress; main() exits with 130."""


class TrainingDiverged(Exception):
    """A NaN or inf loss: main() exits with 3, keeping the last good checkpoint."""


def setup_processes():
    """(rank, world size, device). Under torchrun: one process per GPU (NCCL), or per CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # generous timeout: the other processes wait while process 0 evaluates and saves a stage
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return torch.distributed.get_rank(), world, device


class Run:
    """A run's output folder and the processes working on it.

        out/config.json                      every setting: what --resume reads
        out/metrics.jsonl                    one line per DPO step and per stage summary
        out/<stage>/summary.json             written last: the stage is finished
        out/iter_<i>/labelling.json          self-labelling progress: prompts done, pairs so far
        out/checkpoints/<stage>-step<s>.pt   mid-stage UNet + optimizer, the newest --keep-checkpoints
    """

    def __init__(self, out, args, rank=0, world=1, device=torch.device("cpu")):
        self.out, self.args = Path(out), args
        self.rank, self.world, self.device, self.main = rank, world, device, rank == 0
        self.stages = ["base"] + [f"iter_{i}" for i in range(args.iters + 1)]
        self.stop = False  # set by Ctrl-C or SIGTERM, acted on at the next safe point
        self.log_file = None

    # --- files: process 0 writes, every process reads
    def write(self, path, save):
        """Process 0 writes `path` whole or not at all: save(temporary path), then a rename."""
        if self.main:
            temporary = path.with_name(path.name + ".tmp")
            save(temporary)
            os.replace(temporary, path)  # atomic: a kill leaves the old file or the new one

    def write_json(self, path, value):
        self.write(path, lambda temporary: temporary.write_text(json.dumps(value, indent=1) + "\n"))

    def log(self, record):
        if self.main:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def finished(self, stage):
        return (self.out / stage / "summary.json").exists()

    def save_checkpoint(self, stage, state):
        """state: {"step", "unet", "optimizer", ...}; keeps the newest --keep-checkpoints files."""
        folder = self.out / "checkpoints"
        folder.mkdir(exist_ok=True)
        self.write(folder / f"{stage}-step{state['step']:06d}.pt",
                   lambda temporary: torch.save(state, temporary))
        if self.main:
            order = {name: i for i, name in enumerate(self.stages)}
            saved = sorted(folder.glob("*-step*.pt"),
                           key=lambda path: (order[path.stem.split("-step")[0]], path.stem))
            for path in saved[:-self.args.keep_checkpoints]:
                path.unlink()

    def drop_checkpoints(self, stage):
        """A finished stage's checkpoints: its saved UNet replaces them (SD 1.5: ~10 GB each)."""
        for path in (self.out / "checkpoints").glob(f"{stage}-step*.pt"):
            path.unlink()

    def checkpoint_path(self, stage):
        """The newest checkpoint file of `stage`, or None."""
        saved = sorted((self.out / "checkpoints").glob(f"{stage}-step*.pt"))  # zero-padded steps
        return saved[-1] if saved else None

    def load_checkpoint(self, stage):
        path = self.checkpoint_path(stage)
        return torch.load(path, map_location="cpu", weights_only=True) if path else None

    def open_log(self):
        """Open metrics.jsonl. Resuming, first drop the lines logged after the saved state the run
        continues from (they will be logged again), so the log reads as one uninterrupted run."""
        path = self.out / "metrics.jsonl"
        if self.main and path.exists():
            current = next((stage for stage in self.stages if not self.finished(stage)), None)
            checkpoint = self.checkpoint_path(current) if current else None
            last_step = int(checkpoint.stem.split("-step")[1]) if checkpoint else 0  # no load
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if record["stage"] != current or record.get("step", math.inf) <= last_step:
                    kept.append(line + "\n")
            self.write(path, lambda temporary: temporary.write_text("".join(kept)))
        if self.main:
            self.log_file = open(path, "a")
        self.barrier()

    def progress(self, **kwargs):
        """A tqdm bar, shown by process 0 only (TQDM_DISABLE=1 hides it there too)."""
        return tqdm(leave=False, **kwargs) if self.main else tqdm(disable=True, **kwargs)

    # --- processes: every process calls these at the same points
    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, items):
        """Every process's list of items, concatenated in rank order, in every process."""
        if self.world == 1:
            return items
        lists = [None] * self.world
        torch.distributed.all_gather_object(lists, items)
        return [item for items in lists for item in items]

    def mean(self, values):
        """A tensor averaged over the processes."""
        if self.world > 1:
            values = values.to(self.device)
            torch.distributed.all_reduce(values)
            values = values.cpu() / self.world
        return values

    def stop_asked(self):
        """Was any process asked to stop? All get the same answer, so all stop at the same step."""
        flag = torch.tensor([float(self.stop)], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def ask_to_stop(self, signum, frame):
        """Signal handler: the first Ctrl-C (or SIGTERM) stops at the next safe point, a second at once."""
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        if self.main:
            print("\nstopping after the current step, saving progress (Ctrl-C again: stop at once)",
                  file=sys.stderr, flush=True)


# =================================================================================================
# 6. Diffusion-DPO loss                                               (ALGORITHM: Eq. F, Eq. DPO)
# =================================================================================================

def alpha_bar(scheduler, t, x0):
    """a_t = alphas_cumprod[t], shaped to broadcast over latents: (B, 1, 1, 1)."""
    return scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)


def noisy_latents(scheduler, x0, noise, t):
    """Eq. F: the forward process jumps straight from x_0 to x_t."""
    a_t = alpha_bar(scheduler, t, x0)                                             # (B, 1, 1, 1)
    # Eq. F: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
    return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise


def diffusion_target(scheduler, x0, noise, t):
    """Eq. F's target: what the UNet predicts, per the scheduler's prediction_type (never assumed)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":  # SD 1.5, SDXL: predict the noise eps
        return noise
    if prediction_type == "v_prediction":  # SD 2.x (Salimans & Ho 2022)
        a_t = alpha_bar(scheduler, t, x0)
        # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
        return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0
    raise InputError(f"prediction_type {prediction_type!r} is not supported "
                     "(supported: epsilon, v_prediction)")


def denoising_error(unet, scheduler, x0, noise, t, cond):
    """err_m(x): how badly model m denoises x_0 at (t, eps); (B,) per-sample errors.

    The one function behind the loss, the implicit reward and the tiny world's pretraining.
    """
    x_t = noisy_latents(scheduler, x0, noise, t)                                # (B, C, h, w)
    prediction = unet(x_t, t, **cond).sample                                    # (B, C, h, w)
    target = diffusion_target(scheduler, x0, noise, t)
    # Eq. DPO: err_m(x) = ||target - m(x_t, y, t)||^2, the mean over C, H, W of each sample
    # (as in the Diffusion-DPO official code), in float32 whatever the models' precision
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
# 7. Implicit reward                                                   (ALGORITHM: Eq. 8, Eq. 9)
# =================================================================================================

def implicit_reward(unet, ref_unet, latents, text_emb, scheduler, beta, k, generator,
                    batch_size=None):
    """Eq. 8 for the N candidate latents (N, C, h, w) of one prompt: (N,) rewards.

    r(y, x) = -(beta/2) * (1/K) * sum_k [err_theta(x; t_k, eps_k) - err_ref(x; t_k, eps_k)]

    `text_emb` is the prompt's conditioning, a (1, L, D) tensor or encode_text's dict (or one row
    per candidate, (N, L, D), to judge images of different prompts in one call). The K draws
    (t_k, eps_k) come from `generator` and are shared by all N candidates (common random numbers,
    our choice SPEC 2a): differences between candidates come from the images, not the draws. All
    N*K noisy latents go through each UNet in batches of `batch_size` (default: all at once).
    """
    n = latents.shape[0]
    cond = text_emb if isinstance(text_emb, dict) else {"encoder_hidden_states": text_emb}
    # K draws t_k ~ U{0..T-1}, eps_k ~ N(0, I), the same for every candidate (SPEC 2a)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (k,), generator=generator)  # (K,)
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
# 8. Self-labelling: generate, rank, pair                                          (ALGORITHM)
# =================================================================================================

def set_sampler(pipe, args):
    """Candidates are drawn with the paper's sampler (DDPM for SD 1.5, DDIM for SDXL).

    DDPM and DDIM clip x_0 to [-1, 1] unless told otherwise, which is right for pixels and wrong
    for latents: a config without clip_sample (SDXL's Euler, say) keeps its latents unclipped.
    """
    kind = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[args.sampler]
    config = pipe.scheduler.config
    pipe.scheduler = kind.from_config(config, clip_sample=config.get("clip_sample", False))


def generate(pipe, prompts, n, args, generator):
    """n images for each prompt with the pipeline's own sampler -> latents (P*n, C, h, w), float32.

    `generator`: one generator, or a list with one per image (prompt-major) so that each image's
    noise is its own, whatever else shares the batch.
    """
    with autocast(pipe.device, args.precision):
        return pipe(prompt=prompts, num_images_per_prompt=n, num_inference_steps=args.sample_steps,
                    guidance_scale=args.guidance_scale, height=args.resolution,
                    width=args.resolution, generator=generator, output_type="latent").images.float()


def best_worst_pair(rewards):
    """Best-worst selection: (argmax r, argmin r), or None when they tie.

    The pair with the largest Eq. 9 probability among all N(N-1)/2 pairs. A tie (p == 0.5 within
    float tolerance) carries no preference, so no pair (Diffusion-DPO drops ties too).
    """
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
    Returns, per prompt, None on a tie or (latents (2, C, h, w) and images (2, 3, H, W), chosen
    then rejected, r_w, r_l, p). The latents are exactly what Eq. 8 judged: DPO trains on them.
    """
    n = args.n_candidates
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # training-time noise schedule
    generators = [seeded(args.seed, stage, "candidate", j, c) for j in indices for c in range(n)]
    latents = generate(pipe, prompts, n, args, generators)                # (P*N, C, h, w)
    cond = encode_text(pipe, prompts, args.resolution)                    # (P, L, D)
    found = []
    for p, j in enumerate(indices):
        candidates = latents[p * n:(p + 1) * n]                           # (N, C, h, w)
        generator = seeded(args.seed, stage, "reward", j)
        with autocast(pipe.device, args.reward_precision):
            rewards = implicit_reward(pipe.unet, judge_ref, candidates,
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
                      preference_probability(r_w, r_l).item()))           # Eq. 9
    return found


def self_label(pipe, judge_ref, prompts, first_index, args, run, stage):
    """Self-labelled pairs for one iteration: judge_candidates over every prompt, in rounds.

    Each round gives every process `per_call` prompts; process 0 saves the pairs' images and the
    progress (labelling.json) after each round, so a killed run resumes from the last round.
    Returns the pairs in the seed-pair format with rewards and confidence, and the tie count.
    """
    folder = run.out / stage
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
            latents, images, r_w, r_l, confidence = result
            pair = {"prompt": prompt}
            for key, latent, image in zip(("chosen", "rejected"), latents, images):
                name = f"pairs/{len(progress['pairs']):05d}_{key}"
                pair.update({key: name + ".png", f"{key}_latents": name + ".pt"})
                if run.main:  # the PNG is for people; the latents (C, h, w) are what trains
                    save_image(image, folder / pair[key])
                    torch.save(latent.clone(), folder / pair[f"{key}_latents"])
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
    return pairs, progress["ties"]


FILES = ("chosen", "rejected", "chosen_latents", "rejected_latents")  # a pair's file keys


def pair_paths(pair, change):
    """The pair with change(path) applied to each of its files (absolute <-> relative)."""
    return {**pair, **{key: change(pair[key]) for key in FILES if key in pair}}


# =================================================================================================
# 9. Ranked preference mixup                                                       (ALGORITHM)
# =================================================================================================

def ranked_mixup(self_pairs, seed_pairs, alpha, rng, keep_top=1.0):
    """D_i: rank self-labelled pairs by confidence, keep the top fraction, mix with seed pairs.

    A fraction `alpha` of the result is self-labelled and 1 - alpha is human seed pairs, so
    |D_i| = |S_i| / alpha (our reading of the paper's "ranked preference mixup", SPEC section 2).
    Seed pairs are drawn without replacement, with replacement only if the seed set is too small.
    """
    # confidence sigma(r_w - r_l) (Eq. 9) is monotone in the margin r_w - r_l: rank by it
    ranked = sorted(self_pairs, key=lambda p: p["reward_chosen"] - p["reward_rejected"],
                    reverse=True)
    kept = ranked[:max(1, round(keep_top * len(ranked)))] if ranked else []
    # |D_i| = |S_i| / alpha  =>  seed pairs = |S_i| (1 - alpha) / alpha
    n_seed = round(len(kept) * (1 - alpha) / alpha)
    if n_seed <= len(seed_pairs):
        seeds = rng.sample(seed_pairs, n_seed)
    else:
        seeds = rng.choices(seed_pairs, k=n_seed)
    return kept + seeds


# =================================================================================================
# 10. Training: Diffusion-DPO on a list of pairs                                   (ALGORITHM)
# =================================================================================================

def dpo_step_data(pairs, step, args, stage, latent_shape, timesteps):
    """The global batch of optimizer step `step` and its random draws, the same in every process.

    The batch is positions step*B .. step*B + B-1 of an endless sequence of shuffled passes over
    `pairs`; pass e and step s have generators of their own, so no earlier step is replayed.
    """
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
    t = torch.randint(0, timesteps, (size,), generator=generator)                 # (B,)
    noise = torch.randn((size, *latent_shape), generator=generator)                 # (B, C, h, w)
    posterior_noise = torch.randn((2, size, *latent_shape), generator=generator)    # winners, losers
    return batch, prompts, t, noise, posterior_noise


def latent_shape_of(pipe, resolution):
    """(C, h, w) of the UNet's latents at `resolution` pixels."""
    side = resolution // pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, side, side)


def training_latents(pipe, batch, posterior_noise, resolution):
    """x_0 of a micro-batch's winners then losers: (2b, C, h, w).

    A self-labelled pair trains on exactly the latents Eq. 8 ranked, saved when it was judged (a
    round trip through its PNG and the VAE moves a latent by ~25% and reorders the ranking, SPEC
    section 2). Seed pairs are images: encoded as in Diffusion-DPO, with the step's posterior noise.
    """
    x0 = torch.empty((2, len(batch), *posterior_noise.shape[2:]))                 # (2, b, C, h, w)
    images = [i for i, pair in enumerate(batch) if "chosen_latents" not in pair]
    if images:
        pixels = torch.stack([load_image(batch[i][key], resolution) for key in ("chosen", "rejected")
                              for i in images])                                   # (2e, 3, R, R)
        encoded = encode_images(pipe.vae, pixels.to(pipe.device),
                                posterior_noise[:, images].flatten(0, 1))         # (2e, C, h, w)
        x0[:, images] = encoded.cpu().view(2, len(images), *x0.shape[2:])
    for i, pair in enumerate(batch):
        if "chosen_latents" in pair:
            x0[:, i] = torch.stack([torch.load(pair[f"{key}_latents"], weights_only=True)
                                    for key in ("chosen", "rejected")])             # (2, C, h, w)
    return x0.flatten(0, 1).to(pipe.device)                                         # (2b, C, h, w)


def dpo_micro_batch(model, ref_unet, scheduler, x0, t, noise, cond, beta):
    """Eq. DPO on one micro-batch of b pairs -> (loss, (b,) logits, (2b,) err_theta, err_ref).

    x0 holds the b winners then the b losers; each pair's winner and loser share t and eps.
    """
    shared = (noise.repeat(2, 1, 1, 1), t.repeat(2))               # (2b, C, h, w), (2b,)
    cond = map_cond(lambda v: torch.cat([v, v]), cond)              # (2b, L, D)
    err_theta = denoising_error(model, scheduler, x0, *shared, cond)                 # (2b,)
    with torch.no_grad():
        err_ref = denoising_error(ref_unet, scheduler, x0, *shared, cond)            # (2b,)
    loss, inside = dpo_loss(*err_theta.chunk(2), *err_ref.chunk(2), beta)
    return loss, inside, err_theta.detach(), err_ref


def accumulate_gradients(model, ref_unet, pipe, scheduler, data, args, run, scaler):
    """One optimizer step's gradients: this process's share of the global batch, in micro-batches.

    Returns the step's metrics, averaged over micro-batches and processes.
    """
    batch, prompts, t, noise, posterior_noise = data
    per_process = args.effective_batch // run.world
    micro = min(args.micro_batch, per_process)
    mine = range(run.rank * per_process, (run.rank + 1) * per_process, micro)
    sums = torch.zeros(5)
    for offset in mine:
        part = slice(offset, offset + micro)
        x0 = training_latents(pipe, batch[part], posterior_noise[:, part], args.resolution)
        cond = encode_text(pipe, prompts[part], args.resolution)                    # (b, L, D)
        # DDP averages gradients over processes at the last micro-batch's backward only
        last = offset == mine[-1]
        with (contextlib.nullcontext() if last or run.world == 1 else model.no_sync()):
            with autocast(pipe.device, args.precision):
                loss, inside, err_theta, err_ref = dpo_micro_batch(
                    model, ref_unet, scheduler, x0, t[part].to(pipe.device),
                    noise[part].to(pipe.device), cond, args.beta)
            scaler.scale(loss / len(mine)).backward()
        # TRL's names: rewards/chosen = -(beta/2)(err_theta_w - err_ref_w), one draw of Eq. 8
        r_w, r_l = (-(args.beta / 2) * (err_theta - err_ref)).chunk(2)
        sums += torch.tensor([loss.item(), (inside > 0).float().mean().item(),
                              r_w.mean().item(), r_l.mean().item(), inside.mean().item()])
    values = run.mean(sums / len(mine))  # the same numbers in every process
    return dict(zip(("loss", "implicit_acc", "rewards/chosen", "rewards/rejected",
                     "rewards/margins"), values.tolist()))


MAX_OVERFLOWS = 30  # fp16: a step whose gradients overflow this often in a row has diverged


def diffusion_dpo(pipe, ref_unet, pairs, args, stage, run, loss_scale=2.0 ** 16):
    """Train pipe.unet (theta) with Eq. DPO against the frozen ref_unet; returns mean metrics.

    Each process takes its slice of every global batch of --effective-batch pairs, in micro-batches;
    gradients accumulate over micro-batches and are averaged over processes (DDP). A stage with a
    checkpoint continues from it. fp16: a step whose gradients overflow is redone with half the
    loss scale (counted as `overflows`), never skipped; `loss_scale` carries the last stage's.
    """
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = args.dpo_steps or math.ceil(len(pairs) / args.effective_batch)
    # the official 500 warm-up steps are a quarter of its 2000: a shorter stage warms up over
    # a quarter of its own steps (our choice; SAIL's stages are 300-600 steps at the paper's size)
    warmup = min(args.warmup_steps, steps // 4)
    latent_shape = latent_shape_of(pipe, args.resolution)                       # (C, h, w)
    optimizer = make_optimizer(unet.parameters(), args)
    scaler = torch.amp.GradScaler(pipe.device.type, init_scale=loss_scale,
                                  enabled=args.precision == "fp16")  # fp16 gradients underflow
    history, start = [], 0
    checkpoint = run.load_checkpoint(stage)
    if checkpoint:  # resume: weights, optimizer state and metrics as they were after that step
        unet.load_state_dict(checkpoint["unet"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, start = checkpoint["history"], checkpoint["step"]
    unet.train().requires_grad_(True)
    model = (torch.nn.parallel.DistributedDataParallel(unet) if run.world > 1 else unet)
    for step in run.progress(iterable=range(start, steps), initial=start, total=steps,
                             desc=f"{stage}: Diffusion-DPO"):
        data = dpo_step_data(pairs, step, args, stage, latent_shape,
                             scheduler.config.num_train_timesteps)
        # Diffusion-DPO official: constant_with_warmup, a linear ramp (theirs takes its first step
        # at lr 0; ours at lr / (warmup + 1), one step ahead)
        lr = args.lr * min(1.0, (step + 1) / (warmup + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        for overflows in range(MAX_OVERFLOWS):
            record = accumulate_gradients(model, ref_unet, pipe, scheduler, data, args, run, scaler)
            if not math.isfinite(record["loss"]):  # before the optimizer step: weights stay good
                kept = run.checkpoint_path(stage) or f"none of {stage} yet (the stage before is saved)"
                raise TrainingDiverged(f"{stage}: step {step + 1}: the DPO loss is {record['loss']}; "
                                       f"the last good checkpoint is kept: {kept}")
            scale = scaler.get_scale()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # Diffusion-DPO official: clip at 1
            scaler.step(optimizer)  # skipped when fp16 gradients overflowed...
            scaler.update()         # ...which halves the scale
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() >= scale:  # the step was taken
                break
        else:
            raise TrainingDiverged(f"{stage}: step {step + 1}: fp16 gradients overflowed "
                                   f"{MAX_OVERFLOWS} times in a row")
        if scaler.is_enabled():
            record.update(overflows=overflows, loss_scale=scaler.get_scale())
        run.log({"stage": stage, "step": step + 1, **record, "lr": lr})
        history.append(record)
        stop = run.stop_asked()
        if (step + 1) % args.checkpoint_every == 0 or stop:
            run.save_checkpoint(stage, {"step": step + 1, "unet": unet.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "history": history})
        if stop:
            raise Interrupted(f"{stage}: after DPO step {step + 1} of {steps}")
    unet.eval().requires_grad_(False)
    summary = {name: sum(h[name] for h in history) / len(history) for name in history[0]}
    if scaler.is_enabled():  # totals, not means; the scale the next stage starts from
        summary.update(overflows=sum(h["overflows"] for h in history), loss_scale=scaler.get_scale())
    return summary


def make_optimizer(params, args):
    """Diffusion-DPO official: AdamW, weight decay 1e-2 (the paper: Adafactor for SDXL)."""
    if args.optimizer == "adafactor":  # transformers' Adafactor at a fixed lr, as SDXL DPO used
        return transformers.optimization.Adafactor(params, lr=args.lr, weight_decay=1e-2,
                                                   scale_parameter=False, relative_step=False)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)


def frozen_copy(unet, precision="fp32"):
    """A frozen reference model: no gradients, never trained (Eq. DPO's ref), in --precision."""
    return copy.deepcopy(unet).eval().requires_grad_(False).to(DTYPES[precision])


# =================================================================================================
# 11. The SAIL loop                                                               (ALGORITHM)
# =================================================================================================

EVAL_SEEDS = 4  # images per evaluation prompt after each stage (the same noise at every stage)


def evaluate(pipe, args, folder, eval_prompts):
    """Sample the fixed evaluation prompts with fixed seeds, save a grid; score them in the tiny
    world with the hidden annotator (never seen by SAIL)."""
    generators = [seeded(args.seed, "evaluation", i)  # the same noise at every stage
                  for i in range(len(eval_prompts) * EVAL_SEEDS)]
    latents = generate(pipe, eval_prompts, EVAL_SEEDS, args, generators)
    images = decode_latents(pipe.vae, latents)                 # (E*S, 3, H, W)
    save_grid(images, EVAL_SEEDS, folder / "grid.png")
    if not args.tiny:
        return {}
    prompts = [p for p in eval_prompts for _ in range(EVAL_SEEDS)]
    score = annotator_score(images, prompts)
    seen = torch.tensor([p in TINY_SEEN for p in prompts])
    return {"annotator": score.mean().item(), "annotator/seen": score[seen].mean().item(),
            "annotator/unseen": score[~seen].mean().item(),
            "fidelity": fidelity(images, prompts).float().mean().item()}


def save_grid(images, seeds, path, tile=64):
    """Images (P*S, 3, H, W), prompt-major -> one PNG: a column per prompt, a row per seed."""
    images = F.interpolate(images, size=(tile, tile), mode="nearest" if images.shape[-1] < tile
                           else "bilinear")                                      # (P*S, 3, t, t)
    prompts = images.shape[0] // seeds
    grid = images.view(prompts, seeds, 3, tile, tile).permute(2, 1, 3, 0, 4)     # (3, S, t, P, t)
    save_image(grid.reshape(3, seeds * tile, prompts * tile), path)


def judge_agreement(pipe, judge_ref, heldout, args):
    """judge_acc/heldout: how often the model's own Eq. 8 reward prefers the human winner.

    Per held-out human pair: 1 if r(y, x_w) > r(y, x_l), 1/2 on a tie (Eq. 9 gives 0.5), else 0;
    chance is 0.5. Images are encoded to their posterior means, and every stage judges with the
    same K draws: stages are compared on the same numbers, and swapping a pair's winner and loser
    turns a score s into 1 - s. Its fall is the alarm for self-labelling collapse.
    """
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latent_shape = latent_shape_of(pipe, args.resolution)                       # (C, h, w)
    per_call = max(1, args.reward_batch // (2 * args.k_draws))  # pairs per batch of UNet calls
    scores = []
    for start in range(0, len(heldout), per_call):
        pairs = heldout[start:start + per_call]
        means = torch.zeros((2, len(pairs), *latent_shape))  # posterior noise 0: the means
        x0 = training_latents(pipe, pairs, means, args.resolution)               # (2P, C, h, w)
        cond = encode_text(pipe, [pair["prompt"] for pair in pairs] * 2, args.resolution)
        with autocast(pipe.device, args.reward_precision):
            rewards = implicit_reward(pipe.unet, judge_ref, x0, cond, scheduler, args.beta,
                                      args.k_draws, seeded(args.seed, "heldout"),
                                      args.reward_batch)                         # (2P,)
        r_w, r_l = rewards.chunk(2)                                              # (P,), (P,)
        scores += torch.where(torch.isclose(r_w, r_l), 0.5, (r_w > r_l).float()).tolist()
    return sum(scores) / len(scores)


def sail(args, pipe, data, run):
    """Step 0 and `args.iters` SAIL iterations, every stage written under run.out.

    `data`: seed_pairs (D_init), heldout (human pairs never trained on), prompts (the
    iterations' new prompts) and eval_prompts (the fixed prompts of every stage's grid).
    A resumed run skips the finished stages and continues the first unfinished one from its saved
    progress (labelling.json, then the newest checkpoint).
    """
    set_sampler(pipe, args)
    seed_pairs, prompts = data["seed_pairs"], data["prompts"]
    # eps_base, frozen, on the CPU until needed: step 0's DPO reference in --precision, and
    # Eq. 8's reference in --reward-precision (one copy where the two are the same)
    base_unet = frozen_copy(pipe.unet, args.precision).to("cpu")
    judge_base = (base_unet if args.reward_precision == args.precision
                  else frozen_copy(pipe.unet, args.reward_precision).to("cpu"))

    def saved_unet(stage):  # a finished stage's model, fp32 as saved
        return UNet2DConditionModel.from_pretrained(run.out / stage / "unet")

    def reward_reference(i):  # Eq. 8's reference when eps^i judges (SPEC 2c)
        if args.reward_ref == "base" or i == 0:  # "prev": the model round i started from
            return judge_base
        return frozen_copy(saved_unet(f"iter_{i - 1}"), args.reward_precision)

    def finish_stage(name, started, summary):
        if run.main:
            folder = run.out / name
            folder.mkdir(exist_ok=True)
            if name != "base":  # loads with UNet2DConditionModel.from_pretrained
                pipe.unet.save_pretrained(folder / "unet")
                if data["heldout"]:
                    judge_ref = reward_reference(run.stages.index(name) - 1).to(pipe.device)
                    summary.update({"judge_acc/heldout": judge_agreement(
                        pipe, judge_ref, data["heldout"], args),
                        "heldout_pairs": len(data["heldout"])})
                    judge_ref.to("cpu")
            summary.update(evaluate(pipe, args, folder, data["eval_prompts"]))
            summary["seconds"] = round(time.time() - started, 1)
            run.log({"stage": name, "event": "summary", **summary})
            run.write_json(folder / "summary.json", summary)  # last: the stage is finished
            run.drop_checkpoints(name)  # the saved UNet makes them redundant
            print(" | ".join([name] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in summary.items()]), flush=True)
        run.barrier()

    finished = [stage for stage in run.stages[1:] if run.finished(stage)]
    if finished:  # resuming: the current model is the last finished stage's
        pipe.unet.load_state_dict(saved_unet(finished[-1]).state_dict())
    if not run.finished("base"):
        finish_stage("base", time.time(), {})

    # Step 0: Diffusion-DPO on the human seed pairs, init = ref = base
    if not run.finished("iter_0"):
        started = time.time()
        summary = diffusion_dpo(pipe, base_unet.to(pipe.device), seed_pairs, args, "iter_0", run)
        base_unet.to("cpu")
        finish_stage("iter_0", started, {"pairs": len(seed_pairs), **summary})

    per_iter = args.prompts_per_iter or len(prompts) // max(args.iters, 1)
    for i in range(1, args.iters + 1):
        stage = f"iter_{i}"
        if run.finished(stage):
            continue
        started = time.time()
        folder = run.out / stage
        (folder / "pairs").mkdir(parents=True, exist_ok=True)
        judge_ref = reward_reference(i - 1)  # eps^{i-1} judges
        first = (i - 1) * per_iter
        new_prompts = prompts[first:i * per_iter]  # fresh, disjoint from earlier iterations'
        self_pairs, ties, extra = [], 0, {}
        if args.pairs != "none":  # "none": the iterative seed-only DPO control, seed pairs only
            self_pairs, ties = self_label(pipe, judge_ref.to(pipe.device), new_prompts, first,
                                          args, run, stage)
            if args.tiny and self_pairs:  # hidden from SAIL: does the annotator agree?
                extra["self_label_acc"] = annotator_agrees(self_pairs).float().mean().item()
            if args.oracle_labels:
                self_pairs = annotator_relabel(self_pairs)
        judge_ref.to("cpu")
        run.write_json(folder / "pairs.json", [
            pair_paths(p, lambda path: os.path.relpath(path, folder)) for p in self_pairs])
        mixed = (ranked_mixup(self_pairs, seed_pairs, args.mix_alpha,
                              random.Random(f"{args.seed}-{stage}"), args.keep_top)
                 if self_pairs else list(seed_pairs))
        n_self = sum(1 for p in mixed if "confidence" in p)
        if run.main and args.pairs != "none" and not self_pairs:
            print(f"note: {stage}: all {ties} prompts tied: each prompt's {args.n_candidates} "
                  f"Eq. 8 rewards were equal within float tolerance, so the model still denoises "
                  f"exactly like its reward reference ({args.reward_ref}): training has not moved "
                  f"it (lr {args.lr:.3g}, {args.dpo_steps or 'one pass of'} DPO steps). Raise "
                  "--lr or --dpo-steps. Training on the seed pairs only", flush=True)
        if run.main and len(mixed) - n_self > len(seed_pairs):
            print(f"note: {stage} needs {len(mixed) - n_self} seed pairs but there are "
                  f"{len(seed_pairs)}: drawing them with replacement", flush=True)
        # Iteration i: Diffusion-DPO from the current model, the current model as reference
        ref_unet = frozen_copy(pipe.unet, args.precision)
        scale = json.loads((run.out / f"iter_{i - 1}" / "summary.json").read_text()).get(
            "loss_scale", 2.0 ** 16)  # fp16: start from the scale the last stage ended with
        summary = diffusion_dpo(pipe, ref_unet, mixed, args, stage, run, scale)
        del ref_unet
        finish_stage(stage, started, {"self_pairs": n_self, "seed_pairs": len(mixed) - n_self,
                                      "ties": ties, **summary, **extra})


# =================================================================================================
# 12. Main                                                                      (plumbing)
# =================================================================================================

# Real models without --seed-pairs / --prompts align on real data: a fixed Pick-a-Pic v2 subset,
# sized so that `python sail.py --iters 2` takes about an hour on one 24 GB GPU (README:
# projected from the throughput measured on an H200).
PICKAPIC_SEED_PAIRS = 1000
PICKAPIC_PROMPTS_PER_ITER = 100
HELDOUT_FRACTION, HELDOUT_MAX = 0.05, 500  # seed pairs kept out of training for judge_acc/heldout
EVAL_PROMPTS = 4  # real models: the prompts of every stage's grid, never trained on


def cache_folder(name):
    """~/.cache/sail/<name> (or $SAIL_CACHE/<name>): what a later run can reuse."""
    return Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail")) / name


def pickapic_data(args, world):
    """The default data of a real model: paths of a cached Pick-a-Pic v2 subset's seed pairs and
    prompts (pickapic.py streams it once; the next run reads the cache)."""
    prompts = args.iters * args.prompts_per_iter + EVAL_PROMPTS
    key = hashlib.sha256(repr((args.pickapic_dataset, PICKAPIC_SEED_PAIRS, prompts)).encode())
    folder = cache_folder(f"pickapic-{key.hexdigest()[:12]}")
    import pickapic  # beside sail.py; it imports `datasets` only when it reads one
    try:
        if world == 1 or torch.distributed.get_rank() == 0:  # one process downloads
            pickapic.default_subset(args.pickapic_dataset, folder, PICKAPIC_SEED_PAIRS, prompts)
    except pickapic.InputError as error:
        raise InputError(f"the default data of a real model, a Pick-a-Pic v2 subset: {error}. "
                         "Install datasets and allow the download once, or pass --seed-pairs "
                         "and --prompts (pickapic.py converts Pick-a-Pic shards)")
    if world > 1:
        torch.distributed.barrier()
    return str(folder / "seed_pairs.json"), str(folder / "prompts.txt")


def split_heldout(seed_pairs, args):
    """(seed pairs to train on, held-out human pairs): a file of its own, or a fixed 5% draw."""
    if args.heldout_pairs == "none":
        return seed_pairs, []
    if args.heldout_pairs:
        return seed_pairs, read_seed_pairs(args.heldout_pairs)
    n = min(HELDOUT_MAX, int(HELDOUT_FRACTION * len(seed_pairs)))  # none below 20 seed pairs
    held = set(random.Random(f"{args.seed}-heldout").sample(range(len(seed_pairs)), n))
    return ([pair for i, pair in enumerate(seed_pairs) if i not in held],
            [seed_pairs[i] for i in sorted(held)])


def split_eval_prompts(prompts, seed_pairs, args):
    """(prompts to train on, evaluation prompts). The tiny world evaluates its whole prompt set;
    a real model, the file's last EVAL_PROMPTS prompts that no stage trains on."""
    if args.tiny:
        return prompts, TINY_PROMPTS
    trained = {pair["prompt"] for pair in seed_pairs}
    held = list(dict.fromkeys(p for p in reversed(prompts) if p not in trained))[:EVAL_PROMPTS]
    if not held:
        raise InputError(f"{args.prompts}: every prompt is also a seed pair's: none is left to "
                         "evaluate on")
    return [p for p in prompts if p not in held], held[::-1]


def prepare(args, world):
    """Every check that can fail on user input, before anything is written."""
    if not args.tiny and not (args.seed_pairs or args.prompts):
        args.prompts_per_iter = args.prompts_per_iter or PICKAPIC_PROMPTS_PER_ITER
        args.seed_pairs, args.prompts = pickapic_data(args, world)
    elif not (args.seed_pairs and args.prompts):
        raise InputError("--seed-pairs and --prompts go together: give both, or neither for "
                         "the default data")
    seed_pairs, heldout = split_heldout(read_seed_pairs(args.seed_pairs), args)
    prompts = read_prompts(args.prompts)
    if args.tiny:
        for name, items in ((args.seed_pairs, [p["prompt"] for p in seed_pairs]),
                            (args.prompts, prompts)):
            for i, prompt in enumerate(items):
                if parse_tiny_prompt(prompt) is None:
                    raise InputError(f"{name}: entry {i}: {prompt!r} is not a tiny-world prompt "
                                     f"('a <colour> <shape>', colours {', '.join(TINY_COLOURS)}; "
                                     f"shapes {', '.join(TINY_SHAPES)})")
    prompts, eval_prompts = split_eval_prompts(prompts, seed_pairs, args)
    needed = args.iters * (args.prompts_per_iter or 1)
    if len(prompts) < needed:
        raise InputError(f"{args.prompts}: {len(prompts)} prompts to train on, but {args.iters} "
                         f"iterations x {args.prompts_per_iter or 1} prompts need {needed}")
    data = dict(seed_pairs=seed_pairs, heldout=heldout, prompts=prompts, eval_prompts=eval_prompts)
    per_process = args.effective_batch // world
    if args.effective_batch % world or per_process % min(args.micro_batch, per_process):
        raise InputError(f"--effective-batch {args.effective_batch} must split evenly over {world} "
                         f"process(es), and each share into --micro-batch {args.micro_batch} pairs")
    if args.resume:
        return data, Path(args.resume)  # parse_args read its config.json
    name = [args.out or f"runs/{'tiny' if args.tiny else 'sd'}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:  # the default name holds a time: every process takes process 0's
        torch.distributed.broadcast_object_list(name, src=0)
    out = Path(name[0])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: already exists and is not empty; choose a new folder")
    parent = nearest_existing(out.absolute().parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: cannot create it, {parent} is not a writable folder")
    return data, out


def nearest_existing(path):
    """`path`, or its nearest folder above it that exists: where the run's files will go."""
    return next(folder for folder in [path, *path.absolute().parents] if folder.exists())


def check_disk_space(out, unet, args):
    """Refuse to start a run the disk cannot hold: a UNet per stage plus the kept checkpoints."""
    unet_bytes = 4 * sum(p.numel() for p in unet.parameters())                   # fp32
    optimizer_states = 2 if args.optimizer == "adamw" else 1  # AdamW: 2 moments; Adafactor: <= 1
    checkpoints = (args.keep_checkpoints + 1) * (1 + optimizer_states)  # + 1 while the next is written
    needed = unet_bytes * (args.iters + 1 + checkpoints)
    free = shutil.disk_usage(nearest_existing(out)).free
    if needed > free:
        raise InputError(f"--out {out}: the run writes about {needed / 1e9:.1f} GB (a UNet per "
                         f"stage, {args.keep_checkpoints} checkpoints) but {free / 1e9:.1f} GB "
                         "are free")


def base_model(args, run):
    """The model to align: a hub id or folder, or the tiny world's base (pretrained once and
    cached; each run keeps a copy, which --resume uses)."""
    if not args.tiny:
        return args.model
    if args.resume:
        return str(run.out / "tiny_base")
    if run.main:
        tiny_base_model(args.pretrain_steps)  # pretrains it unless it is cached
    run.barrier()                             # the other processes wait, then read the cache
    return tiny_base_model(args.pretrain_steps)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    rank, world, device = setup_processes()
    say = print if rank == 0 else (lambda *_, **__: None)  # one voice for all processes
    try:
        args = parse_args(argv)
        # The first line says which world this run is in, and why.
        if args.tiny:
            why = ("--tiny" if "--tiny" in argv else "--resume" if args.resume
                   else "no GPU found; pass --model to force a real model")
            say(f"sail: embedded tiny world ({why}): 16x16 shapes, simulated annotator, {device}")
        else:
            say(f"sail: {args.model} on {device}")
        if args.make_seed_pairs:
            make_tiny_seed_pairs(args.seed_pairs, args.seed)
            return 0
        data, out = prepare(args, world)
        run = Run(out, args, rank, world, device)
        model = base_model(args, run)
        pipe = load_pipeline(model, device)
        check_disk_space(out, pipe.unet, args)
    except InputError as error:
        say(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if run.main and not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            shutil.copytree(model, out / "tiny_base")  # the run folder is self-contained
        config = {**asdict(args), "model_path": str(out / "tiny_base") if args.tiny else args.model,
                  "device": str(device), "processes": world, "torch": torch.__version__,
                  "diffusers": diffusers.__version__, "transformers": transformers.__version__}
        run.write_json(out / "config.json", config)
    run.barrier()
    cast_frozen_models(pipe, args.precision)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    say(f"{'resuming' if args.resume else 'writing to'} {out}; reward reference: "
        f"{args.reward_ref}; lr {args.lr:.3g}; N={args.n_candidates} K={args.k_draws} "
        f"beta={args.beta:g} alpha={args.mix_alpha:g}; {args.precision} (Eq. 8 in "
        f"{args.reward_precision}); {len(data['heldout'])} held-out human pairs; "
        f"{world} process(es)",
        flush=True)
    run.open_log()
    handlers = {sig: signal.signal(sig, run.ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sail(args, pipe, data, run)
    except (Interrupted, KeyboardInterrupt) as stopped:
        say(f"stopped{f': {stopped}' if str(stopped) else ''}; the last saved progress is kept; "
            f"continue with: python sail.py --resume {out}", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        say(f"error: {error}; lower --lr or use --precision fp32", file=sys.stderr)
        return 3
    except OSError as error:  # disk full, folder removed...: progress up to the last save is kept
        say(f"error: writing {out} failed: {error}; fix it, then: python sail.py --resume {out}",
            file=sys.stderr)
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if run.log_file:
            run.log_file.close()
    say(f"done in {time.time() - started:.0f} s: {out}")
    return 0


if __name__ == "__main__":
    code = main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)
