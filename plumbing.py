"""Plumbing a reader of sail.py never needs: the command line built from its Args, the input
files read and checked, models loaded (the UNet or transformer that trains, the sampler that fits
it, precision, the optimizer), LoRA, the run folder written whole and resumed, the processes of a
torchrun job, Ctrl-C, live curves (--report-to). None of SAIL's equations is computed here.

A paper-sized run takes hours: it must survive a kill, and may be spread over GPUs (torchrun).
Three rules make both exact rather than approximate:
  1. every random draw comes from a generator seeded by what it is for (seeded): candidate c
     of prompt j, step s of a DPO stage. No draw depends on what ran before it, in this process
     or another, so resuming or splitting the work never changes a number;
  2. every state file is written whole or not at all (a temporary name, then a rename);
  3. only process 0 writes; the others wait for it where they read what it wrote.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet, before the libraries load
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import contextlib
import copy
import dataclasses
import datetime
import difflib
import hashlib
import importlib
import json
import math
import random
import shutil
import signal
import sys
import time
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

import diffusers
import transformers
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

import tiny_world

# Quiet by default: library notes and bars a user cannot act on are silenced here, once.
diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()  # also when diffusers was imported before sail
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
# DDP notes that a 1x1 convolution's gradient has another memory layout than its bucket: harmless
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
# peft, when diffusers loads a second LoRA adapter into a UNet (how stages load, docs/lora.md)
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute in the model")
# torch, when autocast feeds FLUX's fp32 RMSNorm weights bf16 inputs: it uses its unfused kernel
warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")


# =================================================================================================
# Errors
# =================================================================================================

class InputError(Exception):
    """Bad input from the user: sail.main() prints it on one line and exits with code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run saved its progress; main() exits with 130."""


class TrainingDiverged(Exception):
    """A NaN or inf loss: main() exits with 3, keeping the last good checkpoint."""


# =================================================================================================
# The command line: argparse from sail.Args, resume, checks
# =================================================================================================

# --help's groups of sail.Args, each named at its first setting (sail.py's "# ---" comments)
GROUPS = {"model": "what to align, and where to write", "iters": "SAIL (SPEC section 3)",
          "effective_batch": "Diffusion-DPO training", "resolution": "sampling candidates",
          "oracle_labels": "a control of the tiny world",
          "resume": "a long job: resume, memory (none of these changes the algorithm)",
          "lora_rank": "LoRA: less memory, the same algorithm"}


def flag_parser(settings, defaults, description):
    """argparse from a dataclass: dashed names, switches as switches (--no-X too where on by
    default), grouped, defaults shown."""
    parser = argparse.ArgumentParser(prog="sail.py", description=description, allow_abbrev=False)
    for setting in dataclasses.fields(settings):
        if setting.name in GROUPS:
            group = parser.add_argument_group(GROUPS[setting.name])
        kind = setting.type
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = typing.get_args(kind)[0]
        default = defaults.get(setting.name, setting.default)
        shown = "" if default is None or kind is bool else f" (default: {default})"
        metavar = {int: "N", float: "X"}.get(kind, setting.name.split("_")[-1].upper())
        switch = argparse.BooleanOptionalAction if setting.default is True else "store_true"
        options = ({"action": switch} if kind is bool else
                   {"choices": typing.get_args(kind)} if typing.get_origin(kind) is typing.Literal
                   else {"type": kind, "metavar": metavar})
        group.add_argument("--" + setting.name.replace("_", "-"), default=default,
                           help=setting.metadata["help"] + shown, **options)
    return parser


PATHS = ("seed_pairs", "prompts", "heldout_pairs", "model")  # stored absolute: --resume from anywhere


def absolute_paths(settings):
    """The path settings that exist, made absolute: config.json then works from any folder."""
    for name in PATHS:
        value = settings.get(name)
        if value and value != "none" and Path(value).exists():
            settings[name] = str(Path(value).absolute())
    return settings


def parse_flags(parser, argv):
    """argv -> a dict of settings; an unknown flag is bad input, named with the closest one."""
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag.split("=")[0], list(parser._option_string_actions), n=1)
        raise InputError(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")
                         + "; python sail.py --help lists every flag")
    return absolute_paths(vars(known))


def default_precision():
    """bf16 on a GPU that has it (A100, H100, RTX 30xx and later), else fp32."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_settings(args, world):
    """Values no run can use: one line naming the flag."""
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
        (args.pickapic_pairs >= 1, "--pickapic-pairs must be >= 1"),
        (args.prompts_per_iter is None or args.prompts_per_iter >= 1,
         "--prompts-per-iter must be >= 1"),
        (0 <= args.cfg_dropout < 1, "--cfg-dropout must be in [0, 1)"),
        (args.resolution >= 8 and args.resolution % 8 == 0, "--resolution must be a multiple of 8"),
        (args.sample_steps >= 1, "--sample-steps must be >= 1"),
        (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (args.generation_batch >= 1 and args.reward_batch >= 1, "batch sizes must be >= 1"),
        (args.eval_seeds >= 1, "--eval-seeds must be >= 1"),
        (args.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
        (args.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
        (args.tiny or not args.oracle_labels, "--oracle-labels needs the tiny world's annotator"),
        (args.tiny_world in tiny_world.WORLDS, f"--tiny-world must be one of {', '.join(tiny_world.WORLDS)}"),
        (args.tiny or args.tiny_world == "shapes", "--tiny-world needs the tiny world (--tiny)"),
        (args.tiny or args.tiny_model == "ddpm", "--tiny-model needs the tiny world (--tiny)"),
        (args.lora_rank >= 0, "--lora-rank must be >= 0 (0: full fine-tuning)"),
        (args.lora_alpha is None or args.lora_alpha > 0, "--lora-alpha must be > 0"),
        (args.lora_rank or not args.save_merged,
         "--save-merged needs --lora-rank (full fine-tuning always saves the whole UNet)"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if args.lora_rank:
        peft()  # installed?
    if args.report_to != "none":
        reporter_package(args.report_to)  # installed?
    per_process = args.effective_batch // world
    if args.effective_batch % world or per_process % min(args.micro_batch, per_process):
        raise InputError(f"--effective-batch {args.effective_batch} must split evenly over {world} "
                         f"process(es), and each share into --micro-batch {args.micro_batch} pairs")


# Settings a resumed run may change: they decide how the work is split and saved, not what it computes.
RESUME_MAY_CHANGE = ("resume", "checkpoint_every", "keep_checkpoints", "micro_batch",
                     "generation_batch", "reward_batch", "report_to")


def saved_settings(folder, names):
    """The settings `names` a run folder was started with (its config.json), for --resume."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"--resume {folder}: not a sail.py run folder ({path}: {error})")
    # one a resume may change may be missing: a run started before the setting existed
    missing = [name for name in names if name not in config and name not in RESUME_MAY_CHANGE]
    if missing:
        raise InputError(f"--resume {folder}: {path} lacks {', '.join(missing)}: not a run "
                         "of this sail.py")
    return {name: config[name] for name in names if name in config and name != "out"}


def refuse_changes(args, saved):
    """A resumed run keeps its settings: a flag given again must agree with config.json."""
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {saved[name]})"
               for name in saved if name not in RESUME_MAY_CHANGE and getattr(args, name) != saved[name]]
    if changed or (args.out and Path(args.out) != Path(args.resume)):
        raise InputError(f"--resume {args.resume}: a resumed run keeps its settings: "
                         + "; ".join(changed or [f"--out {args.out}"]))


# =================================================================================================
# Input files and the data of a run: read and checked before any work
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


def vae_posterior(vae, images):
    """The VAE's posterior of images (B, 3, H, W) in [-1, 1]: its mean and std, (B, C, h, w) each."""
    with torch.no_grad():
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


class Posteriors:
    """Image files -> their VAE posteriors, for sail.training_latents.

    Without `cached` (--no-cache-posteriors; the tiny world), every call runs the VAE on its images,
    as Diffusion-DPO encodes each step's pairs. With it (real models), the images of `cached` (the
    seed pairs') are encoded once a run, on first use, in fixed chunks of `chunk` images in their
    order, and kept on the CPU in the VAE's dtype: a step then only draws mean + std * eps. Fixed
    chunks give the same numbers after a resume and in every process (a batch's composition moves a
    VAE's output by float rounding: 2e-6 in the tiny world). Cost: (2 x C x h x w) numbers an image,
    SD 1.5 at 512 px in bf16 64 KB, so 6.6 GB of memory for the paper's ~50K pairs (100K images).
    """

    def __init__(self, vae, resolution, cached=(), chunk=16):
        self.vae, self.resolution, self.kept = vae, resolution, {}
        order = list(dict.fromkeys(cached))  # each image once, in the seed pairs' order
        self.chunks = [order[i:i + chunk] for i in range(0, len(order), chunk)]
        self.chunk_of = {path: i // chunk for i, path in enumerate(order)}

    def encode(self, paths):
        pixels = torch.stack([load_image(path, self.resolution) for path in paths])  # (n, 3, R, R)
        return vae_posterior(self.vae, pixels.to(self.vae.device))

    def __call__(self, paths):
        """(mean, std) of these images' posteriors: (n, C, h, w) each, on the VAE's device."""
        if not all(path in self.chunk_of for path in paths):  # not all cached images: encode now
            return self.encode(paths)
        for chunk in sorted({self.chunk_of[path] for path in paths if path not in self.kept}):
            mean, std = self.encode(self.chunks[chunk])
            self.kept.update(zip(self.chunks[chunk], zip(mean.cpu(), std.cpu())))
        mean, std = zip(*(self.kept[path] for path in paths))
        return torch.stack(mean).to(self.vae.device), torch.stack(std).to(self.vae.device)


def kept_posteriors(vae, seed_pairs, args):
    """--cache-posteriors: the seed pairs' images, their posteriors kept once a run, in chunks of a
    micro-batch's images (2 x --micro-batch: no more VAE memory than a step's encoding)."""
    images = [pair[key] for pair in seed_pairs for key in ("chosen", "rejected")]
    return Posteriors(vae, args.resolution, images, 2 * args.micro_batch)


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
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def save_image(image, path):
    """(3, H, W) tensor in [0, 1] -> PNG file."""
    to_pil(image).save(path)


# Real models without --seed-pairs / --prompts align on real data: a fixed Pick-a-Pic v2 subset,
# sized so that `python sail.py --iters 2` takes about an hour on one 24 GB GPU (docs/real-models.md:
# projected from the throughput measured on an H200).
PICKAPIC_PROMPTS_PER_ITER = 100
# A stage this short is a check of the real path, not an alignment: Diffusion-DPO trained SD 1.5
# for 2000 steps, and the paper's 50K seed pairs make about 390 steps of 128 pairs.
CHECK_STEPS = 100
# Seed pairs kept out of training for judge_acc/heldout: a fixed 5%, at most 500; below 20 pairs a
# judge's agreement moves in steps too coarse to read (3 pairs: thirds), so then there is none.
HELDOUT_FRACTION, HELDOUT_MIN, HELDOUT_MAX = 0.05, 20, 500
EVAL_PROMPTS = 4  # real models: the prompts of every stage's grid, never trained on


def pickapic_data(args, world):
    """The default data of a real model: paths of a cached Pick-a-Pic v2 subset's seed pairs and
    prompts (pickapic.py downloads the shards it needs once; the next run reads the cache)."""
    prompts = args.iters * args.prompts_per_iter + EVAL_PROMPTS
    key = hashlib.sha256(repr((args.pickapic_dataset, args.pickapic_pairs, prompts)).encode())
    cache = Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail"))
    folder = cache / f"pickapic-{key.hexdigest()[:12]}"
    import pickapic  # beside sail.py; it imports huggingface_hub and pyarrow only when it reads
    try:
        if world == 1 or torch.distributed.get_rank() == 0:  # one process downloads
            pickapic.default_subset(args.pickapic_dataset, folder, args.pickapic_pairs, prompts)
    except pickapic.InputError as error:
        raise InputError(f"the default data of a real model, a Pick-a-Pic v2 subset: {error}; "
                         "or pass --seed-pairs and --prompts (pickapic.py converts Pick-a-Pic "
                         "shards)")
    if world > 1:
        torch.distributed.barrier()
    return str(folder / "seed_pairs.json"), str(folder / "prompts.txt")


def opening_line(args, argv, device):
    """The run's first line: which world it is in, and why; a real model on the default data
    also says what the job is."""
    if args.tiny:
        why = ("--tiny" if "--tiny" in argv else "--resume" if args.resume
               else "no GPU found; pass --model to force a real model")
        flow = ", an SD3-shaped rectified flow" if args.tiny_model == "flow" else ""
        return f"sail: embedded tiny world ({why}): 16x16 shapes{flow}, simulated annotator, {device}"
    return f"sail: {args.model} on {device}{default_job(args)}"


def default_job(args):
    """For the run's first line: a real model on the default data says what the job is."""
    if args.tiny or args.resume or args.seed_pairs or args.prompts:
        return ""
    trained = args.pickapic_pairs - heldout_size(args.pickapic_pairs)
    per_iter = args.prompts_per_iter or PICKAPIC_PROMPTS_PER_ITER
    # step 0 trains on the seed pairs; an iteration on at most per_iter self-labelled pairs / alpha
    steps = [args.dpo_steps or math.ceil(n / args.effective_batch)
             for n in (trained, per_iter / args.mix_alpha)]
    what = (": a check of the whole real path, not an alignment (README, Quickstart: a run that "
            "aligns)" if max(steps) < CHECK_STEPS else "")
    return (f"; default data: {args.pickapic_pairs} Pick-a-Pic v2 pairs, {per_iter} new prompts "
            f"per iteration; Diffusion-DPO: {steps[0]} steps in step 0, at most {steps[1]} per "
            f"iteration, lr {args.lr:.3g}{what}")


def heldout_size(n_pairs):
    """How many of n seed pairs the random split holds out: 5%, at most 500, none below 20."""
    n = min(HELDOUT_MAX, int(HELDOUT_FRACTION * n_pairs))
    return n if n >= HELDOUT_MIN else 0


def split_heldout(seed_pairs, args):
    """(seed pairs to train on, held-out human pairs, why there are none or ""): a file of its
    own, or a fixed 5% draw of at least HELDOUT_MIN pairs."""
    if args.heldout_pairs == "none":
        return seed_pairs, [], "--heldout-pairs none"
    if args.heldout_pairs:
        return seed_pairs, read_seed_pairs(args.heldout_pairs), ""
    n = heldout_size(len(seed_pairs))
    if not n:
        return seed_pairs, [], (f"5% of {len(seed_pairs)} seed pairs is "
                                f"{int(HELDOUT_FRACTION * len(seed_pairs))}, below the "
                                f"{HELDOUT_MIN} a judge needs; --heldout-pairs FILE gives one")
    held = set(random.Random(f"{args.seed}-heldout").sample(range(len(seed_pairs)), n))
    return ([pair for i, pair in enumerate(seed_pairs) if i not in held],
            [seed_pairs[i] for i in sorted(held)], "")


def split_eval_prompts(prompts, seed_pairs, args):
    """(prompts to train on, evaluation prompts). The tiny world evaluates its whole prompt set;
    a real model, the file's last EVAL_PROMPTS prompts that no stage trains on."""
    if args.tiny:
        return prompts, tiny_world.PROMPTS
    trained = {pair["prompt"] for pair in seed_pairs}
    held = list(dict.fromkeys(p for p in reversed(prompts) if p not in trained))[:EVAL_PROMPTS]
    if not held:
        raise InputError(f"{args.prompts}: every prompt is also a seed pair's: none is left to "
                         "evaluate on")
    return [p for p in prompts if p not in held], held[::-1]


def read_data(args, world):
    """Seed pairs, held-out pairs, prompts and evaluation prompts, every entry checked."""
    if not args.tiny and not (args.seed_pairs or args.prompts):
        args.prompts_per_iter = args.prompts_per_iter or PICKAPIC_PROMPTS_PER_ITER
        args.seed_pairs, args.prompts = pickapic_data(args, world)
    elif not (args.seed_pairs and args.prompts):
        raise InputError("--seed-pairs and --prompts go together: give both, or neither for "
                         "the default data")
    if args.tiny:  # the run's world: its annotator, and a variant world's own human pairs
        tiny_world.use_world(args.tiny_world)
        args.seed_pairs, args.heldout_pairs = tiny_world.human_pairs(args)
    seed_pairs, heldout, no_judge = split_heldout(read_seed_pairs(args.seed_pairs), args)
    prompts = read_prompts(args.prompts)
    if args.tiny:
        for name, items in ((args.seed_pairs, [p["prompt"] for p in seed_pairs]),
                            (args.prompts, prompts)):
            for i, prompt in enumerate(items):
                if tiny_world.parse_prompt(prompt) is None:
                    raise InputError(f"{name}: entry {i}: {prompt!r} is not a tiny-world prompt "
                                     f"({tiny_world.PROMPT_FORMAT})")
    prompts, eval_prompts = split_eval_prompts(prompts, seed_pairs, args)
    needed = args.iters * (args.prompts_per_iter or 1)
    if len(prompts) < needed:
        raise InputError(f"{args.prompts}: {len(prompts)} prompts to train on, but {args.iters} "
                         f"iterations x {args.prompts_per_iter or 1} prompts need {needed}")
    return dict(seed_pairs=seed_pairs, heldout=heldout, prompts=prompts, eval_prompts=eval_prompts,
                heldout_note=f"no held-out judge: {no_judge}" if no_judge else
                f"{len(heldout)} held-out human pairs")


# =================================================================================================
# Loading a pipeline
# =================================================================================================

def first_line(error):
    """An exception's first line, for a one-line message (its type when it has no text)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def cannot_load(model, error):
    """One line. A local folder: the part or weights file that failed. A hub id (or a folder that
    does not exist): perhaps no network or no weights, so it names --tiny."""
    folder = Path(model)
    if folder.is_dir():
        return InputError(f"could not load --model {model}: {broken_part(folder) or first_line(error)}")
    return InputError(f"could not load --model {model}: {first_line(error)} "
                      "(no network or weights? run with --tiny for the embedded tiny world)")


def broken_part(folder):
    """What is wrong with a local pipeline folder, or None: no model_index.json, a part it lists
    that the folder lacks, or a weights file that does not read (safetensors checks its header)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return f"no readable {folder / 'model_index.json'} (a diffusers pipeline folder has one)"
    for name, value in index.items():  # a part: [library, class]; [null, null] is left out
        if isinstance(value, list) and None not in value and not (folder / name / "").is_dir():
            return f"model_index.json lists {name} ({value[1]}), but {folder / name} is missing"
    from safetensors import safe_open  # diffusers' own dependency
    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as error:  # truncated, not safetensors
            return f"{path}: {first_line(error)}"
    return None


def pipeline_class(model, supported):
    """The pipeline class a hub id or folder declares (model_index.json), before loading weights."""
    try:
        name = DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as error:
        raise cannot_load(model, error)
    if name not in supported:
        raise InputError(f"--model {model}: pipeline class {name} is not supported "
                         f"(supported: {', '.join(supported)})")
    return name


def load_pipeline(model, device):
    """A diffusers text-to-image pipeline (SD, SDXL, SD3, FLUX) from a hub id or folder, all frozen."""
    try:  # a part saved as null stays out (SD3 saved without T5: text_encoder_3 = None)
        left_out = {name: None for name, value in DiffusionPipeline.load_config(model).items()
                    if value == [None, None]}
        pipe = DiffusionPipeline.from_pretrained(model, **{"safety_checker": None, **left_out},
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


def denoiser(pipe):
    """The network SAIL trains: the UNet (SD, SDXL) or the transformer (SD3, FLUX)."""
    return pipe.components["unet" if "unet" in pipe.components else "transformer"]


def denoiser_folder(model):
    """Its subfolder in a pipeline folder and in each stage's output: unet/ or transformer/."""
    return "unet" if "UNet" in type(model).__name__ else "transformer"


def check_model(pipe, args):
    """Before anything is written: the sampler suits the model, and LoRA finds what it adapts."""
    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    if flow != (args.sampler == "euler"):
        raise InputError(f"--sampler {args.sampler}: {type(pipe).__name__} samples with "
                         + ("its flow-matching Euler: use --sampler euler" if flow
                            else "DDPM or DDIM (euler is for flow-matching models)"))
    if args.pair_noise == "prior" and not flow:
        raise InputError(f"--pair-noise prior: {type(pipe).__name__} is no flow-matching model "
                         "(PNAPO keeps each image's starting noise on the straight path of a "
                         "rectified flow; DDPM's sampling path is not straight)")
    targets = lora_modules(denoiser(pipe))
    if args.lora_rank and not any(name == target or name.endswith("." + target)  # peft's rule
                                  for name, _ in denoiser(pipe).named_modules() for target in targets):
        raise InputError(f"--lora-rank: the {denoiser_folder(denoiser(pipe))} of {args.model} has "
                         f"none of the attention projections LoRA adapts ({', '.join(targets)})")


# =================================================================================================
# How the models run (precision, sampler) and a stage's picture: not what SAIL computes
# =================================================================================================

# Memory: one GPU must be enough for SD 1.5. Frozen models -- the reference UNets, the VAE and the
# text encoders -- are stored in --precision; the trained UNet keeps fp32 weights (AdamW updates of
# lr x grad are far below bf16's resolution) and its forward passes run under autocast. LoRA: only
# the adapters train, so they are what stays fp32; the network's own weights are frozen models too.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen_models(pipe, precision, lora=False):
    """Text encoders and VAE to `precision`, and with LoRA the denoiser's own (frozen) weights; a
    VAE whose config asks to stay fp32 (force_upcast: SD's and SDXL's VAEs overflow in fp16) stays
    fp32 in fp16 runs."""
    dtype, trained = DTYPES[precision], denoiser(pipe)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module) and (part is not trained or lora):
            upcast = name == "vae" and dtype == torch.float16 and part.config.force_upcast
            part.to(torch.float32 if upcast else dtype)


def autocast(device, precision):
    """Mixed precision for the UNets' forward passes: matmuls and convolutions in `precision`."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


@contextlib.contextmanager
def own_dtype(reference):
    """Eq. DPO's frozen reference stored in half precision runs in it, outside autocast, its inputs
    cast on the way in, as the official Diffusion-DPO code runs its fp16 reference: no casts to fp32
    and back around each norm and softmax. The timestep stays as it is (the model embeds it in
    fp32), and so does a reference in fp32 or of mixed dtypes (LoRA's rounds: autocast as before)."""
    dtypes = {p.dtype for p in reference.parameters()} if isinstance(reference, torch.nn.Module) else set()
    if len(dtypes) != 1 or dtypes == {torch.float32}:
        yield
        return
    dtype = dtypes.pop()

    def cast(value, name=""):
        if isinstance(value, dict):
            return {key: cast(item, key) for key, item in value.items()}
        floating = torch.is_tensor(value) and value.is_floating_point() and name != "timestep"
        return value.to(dtype) if floating else value

    hook = reference.register_forward_pre_hook(
        lambda _, args, kwargs: (tuple(cast(a) for a in args), cast(kwargs)), with_kwargs=True)
    try:
        with torch.autocast(next(reference.parameters()).device.type, enabled=False):
            yield
    finally:
        hook.remove()


def frozen_copy(unet, precision="fp32"):
    """A frozen reference model: no gradients, never trained (Eq. DPO's ref), in `precision`."""
    return copy.deepcopy(unet).eval().requires_grad_(False).to(DTYPES[precision])


def set_sampler(pipe, args):
    """Candidates are drawn with the paper's sampler (DDPM for SD 1.5, DDIM for SDXL); flow models
    with their own flow-matching Euler (--sampler euler, checked in check_model).

    DDPM and DDIM clip x_0 to [-1, 1] unless told otherwise, which is right for pixels and wrong
    for latents: a config without clip_sample (SDXL's Euler, say) keeps its latents unclipped.
    """
    if args.sampler == "euler":
        return
    kind = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[args.sampler]
    config = pipe.scheduler.config
    pipe.scheduler = kind.from_config(config, clip_sample=config.get("clip_sample", False))


def save_grid(images, seeds, path, tile=64):
    """Images (P*S, 3, H, W), prompt-major -> one PNG: a column per prompt, a row per seed."""
    images = F.interpolate(images, size=(tile, tile), mode="nearest" if images.shape[-1] < tile
                           else "bilinear")                                      # (P*S, 3, t, t)
    prompts = images.shape[0] // seeds
    grid = images.view(prompts, seeds, 3, tile, tile).permute(2, 1, 3, 0, 4)     # (3, S, t, P, t)
    save_image(grid.reshape(3, seeds * tile, prompts * tile), path)


def starting_noise(pipe, shape, generators):
    """The noise each image's sampling started from, (B, C, h, w) float32, drawn again from
    generators seeded as the pipeline's were, as its prepare_latents draws it (diffusers'
    randn_tensor, in the text embeddings' dtype; FLUX packs the same draw into tokens)."""
    return diffusers.utils.torch_utils.randn_tensor(
        shape, generator=generators, device=pipe.device, dtype=pipe.text_encoder.dtype).float()


def schedule_on(scheduler, device):
    """The training schedule's tables (DDPM: alphas_cumprod; flow: sigmas, timesteps) moved to the
    device once: every forward reads them, and a copy from the host would wait for the GPU."""
    for name in ("alphas_cumprod", "sigmas", "timesteps"):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, getattr(scheduler, name).to(device))
    return scheduler


def map_cond(fn, cond):
    """Apply fn to every tensor of a conditioning dict (nested for SDXL): repeat, slice, concat."""
    return {name: map_cond(fn, value) if isinstance(value, dict) else fn(value)
            for name, value in cond.items()}


def latent_shape_of(pipe, resolution):
    """(C, h, w) of the UNet's latents at `resolution` pixels."""
    side = resolution // pipe.vae_scale_factor
    return (pipe.vae.config.latent_channels, side, side)


def make_optimizer(params, args):
    """Diffusion-DPO official: AdamW, weight decay 1e-2 (the paper: Adafactor for SDXL)."""
    if args.optimizer == "adafactor":  # transformers' Adafactor at a fixed lr, as SDXL DPO used
        return transformers.optimization.Adafactor(params, lr=args.lr, weight_decay=1e-2,
                                                   scale_parameter=False, relative_step=False)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)


def base_model(args, run):
    """The model to align: a hub id or folder, or the tiny world's base (shipped in tiny_base/;
    each run keeps a copy, which --resume uses)."""
    if not args.tiny:
        return args.model
    return str(run.out / "tiny_base") if args.resume else str(tiny_world.BASES[args.tiny_model])


# =================================================================================================
# LoRA (--lora-rank): the same algorithm with fewer trained weights and no second network
# =================================================================================================
# Adapters where each family's own diffusers LoRA script puts them: a UNet's attention projections,
# as the Diffusion-DPO example trains them (examples/research_projects/diffusion_dpo/
# train_diffusion_dpo.py: LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
# target_modules=...); its README: rank 8); SD3 adds its text stream's projections
# (train_dreambooth_lora_sd3.py's default), FLUX also both streams' feed-forwards
# (train_dreambooth_lora_flux.py's default). Only the adapters train, so the network's own weights
# need neither gradients nor AdamW moments, nor fp32: they stay frozen in --precision (as those
# scripts keep them), never copied. Each round's adapters stay adapters of their own, named after
# the round, frozen once it ends: stage i = base + rounds 0..i, and every model SAIL needs is the
# one network with some rounds switched on (Rounds).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
SD3_LORA = [*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_MODULES = {"SD3Transformer2DModel": SD3_LORA, "FluxTransformer2DModel": [
    *SD3_LORA, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]}


def lora_modules(model):
    """The names (peft's suffix rule) of the modules LoRA adapts in this denoiser."""
    return LORA_MODULES.get(type(getattr(model, "module", model)).__name__, ATTENTION)
# The default lr: adapters start at B = 0 and need larger steps than full fine-tuning. Real
# models: the same example's 1e-5 (batch 32); the tiny world: searched, then checked (docs/lora.md).
LORA_LR = {"real": 1e-5, "tiny": 1e-3}


def peft():
    """peft, optional: imported only when --lora-rank asks for it."""
    try:
        import peft
    except ImportError:
        raise InputError("--lora-rank needs the peft package: pip install peft") from None
    return peft


def rounds_of(unet):
    """The rounds whose adapters the network holds, in the order they trained."""
    return list(getattr(unet, "peft_config", {}))


def switch_rounds(unet, rounds):
    """Run the network with the adapters of `rounds` on and every other round's off. Set layer by
    layer: peft's own set_adapter would also make the adapters it switches on trainable."""
    for layer in unet.modules():
        if isinstance(layer, peft().tuners.tuners_utils.BaseTunerLayer):
            layer._active_adapter, layer._disable_adapters = list(rounds), not rounds


class Rounds:
    """The trained network run with only the adapters of `rounds`, called like a UNet: Eq. DPO's
    reference (the rounds before the current one), Eq. 8's base (no round) or previous model
    (the rounds before the judge's). Between calls every round is on, as training and sampling
    need it: a model SAIL compares with, without a second network in memory."""

    def __init__(self, unet, rounds):
        self.unet, self.rounds = unet, list(rounds)

    device = property(lambda self: self.unet.device)
    dtype = property(lambda self: self.unet.dtype)
    config = property(lambda self: self.unet.config)

    def to(self, *_):  # it lives wherever the trained network does
        return self

    def __call__(self, *args, **kwargs):
        switch_rounds(self.unet, self.rounds)
        try:
            return self.unet(*args, **kwargs)
        finally:
            switch_rounds(self.unet, rounds_of(self.unet))


def base_references(pipe, args):
    """eps_base as step 0's DPO reference (in --precision) and as Eq. 8's (in --reward-precision):
    frozen copies kept on the CPU until needed, one where the two precisions agree; LoRA: the
    trained network itself with no round's adapters on."""
    unet = denoiser(pipe)
    if args.lora_rank:
        return Rounds(unet, []), Rounds(unet, [])
    base = frozen_copy(unet, args.precision).to("cpu")
    return base, (base if args.reward_precision == args.precision
                  else frozen_copy(unet, args.reward_precision).to("cpu"))


def begin_lora_round(unet, args, stage):
    """Round `stage` starts: fresh adapters in fp32 (B = 0, so theta == ref at step 1) are the
    only weights that train; the earlier rounds' stay on, frozen. Returns Eq. DPO's reference:
    the network with the earlier rounds only, the model the round started from."""
    earlier = rounds_of(unet)
    config = peft().LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                               init_lora_weights="gaussian", target_modules=lora_modules(unet))
    with torch.random.fork_rng(devices=[]):  # A ~ N(0, 1/r^2) from the round's own generator
        torch.manual_seed(seeded(args.seed, stage, "lora").initial_seed())
        unet.add_adapter(config, adapter_name=stage)  # in the base's dtype: to fp32 below
    for parameter in unet.parameters():  # the new round's adapters, the only ones add_adapter
        if parameter.requires_grad:      # leaves trainable; fp32 so that lr x grad is not lost
            parameter.data = parameter.data.float()
    switch_rounds(unet, [*earlier, stage])
    return Rounds(unet, earlier)


@contextlib.contextmanager
def judging(pipe, args):
    """Eq. 8 in --reward-precision whatever the network is stored in: autocast to it, and where
    LoRA keeps the base in half precision and Eq. 8 runs in fp32, each layer's weights cast to
    fp32 while it runs (one layer's copy at a time, never the network's)."""
    unet, stash = denoiser(pipe), {}

    def upcast(layer, _):
        stash[layer] = [p.data for p in layer.parameters(recurse=False)]
        for p in layer.parameters(recurse=False):
            p.data = p.data.float()

    def restore(layer, *_):
        for p, data in zip(layer.parameters(recurse=False), stash.pop(layer)):
            p.data = data

    half = ([layer for layer in unet.modules()
             if any(p.dtype != torch.float32 for p in layer.parameters(recurse=False))]
            if args.reward_precision == "fp32" else [])  # layers stored below fp32
    hooks = [hook for layer in half for hook in (layer.register_forward_pre_hook(upcast),
                                                  layer.register_forward_hook(restore))]
    try:
        with autocast(pipe.device, args.reward_precision):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def save_adapters(pipe, folder, stage):
    """<folder>/pytorch_lora_weights.safetensors, round `stage`'s adapters with their rank and
    alpha: what pipe.load_lora_weights(folder, adapter_name=stage) reads."""
    model = denoiser(pipe)
    name = denoiser_folder(model)  # unet_lora_layers, or transformer_lora_layers for SD3 / FLUX
    type(pipe).save_lora_weights(folder, **{
        f"{name}_lora_layers": peft().utils.get_peft_model_state_dict(model, adapter_name=stage),
        f"{name}_lora_adapter_metadata": model.peft_config[stage].to_dict()})


def merged_copy(unet):
    """--save-merged: a CPU copy of the network in fp32 with every round's adapters merged,
    W + sum_i (alpha / r) B_i A_i (in a half-precision base most of that sum would round away);
    training keeps its own."""
    device = unet.device
    merged = copy.deepcopy(unet.to("cpu")).float()
    unet.to(device)
    merged.fuse_lora(adapter_names=rounds_of(merged))
    merged.unload_lora()
    return merged


def restore_adapters(unet, args, out, stages):
    """Resuming: every finished stage's adapters, added as training added them and loaded in fp32
    as they were saved (diffusers' load_lora_weights would make them the base's dtype)."""
    from safetensors.torch import load_file  # diffusers' own dependency
    prefix = denoiser_folder(unet) + "."
    for stage in stages:
        begin_lora_round(unet, args, stage)
        saved = load_file(out / stage / "lora" / "pytorch_lora_weights.safetensors")
        peft().set_peft_model_state_dict(unet, {name.removeprefix(prefix): value for name, value
                                                in saved.items()}, adapter_name=stage)


# =================================================================================================
# The run folder and its processes (the three rules above)
# =================================================================================================

def run_folder(args, world):
    """--resume or --out, or runs/<world>-<time>: in every process process 0's (the time differs)."""
    name = [args.resume or args.out
            or f"runs/{'tiny' if args.tiny else 'sd'}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def seeded(seed, *keys):
    """The generator of one unit of work, e.g. seeded(0, "iter_1", "candidate", 17, 3): no draw
    depends on what ran before it, so resuming or splitting the work never changes a number."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


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
        out/tensorboard/{steps,stages}/      --report-to tensorboard: metrics.jsonl's curves, the grids
    """

    def __init__(self, out, args, rank=0, world=1, device=torch.device("cpu")):
        self.out, self.args = Path(out), args
        self.rank, self.world, self.device, self.main = rank, world, device, rank == 0
        self.stages = ["base"] + [f"iter_{i}" for i in range(args.iters + 1)]
        self.stop = False  # set by Ctrl-C or SIGTERM, acted on at the next safe point
        self.log_file = self.reporter = None
        self.posteriors = None  # the seed pairs' VAE posteriors, kept (--cache-posteriors)

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
            if "step" in record and record.get("overflows"):  # fp16 redid the step: say so
                tqdm.write(f"{record['stage']}: step {record['step']}: fp16 gradients overflowed "
                           f"{record['overflows']} time(s); redone at half the loss scale each "
                           f"time, now {record['loss_scale']:g}", file=sys.stderr)
            if self.reporter:
                self.reporter.log(record)

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
        logged = []  # the records it keeps: a reporter's x-axis counts their steps
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
                    logged.append(record)
            self.write(path, lambda temporary: temporary.write_text("".join(kept)))
        if self.main:
            self.log_file = open(path, "a")
        if self.main and self.args.report_to != "none":
            self.reporter = Reporter(self.args.report_to, self.out, dataclasses.asdict(self.args),
                                     logged)
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


    @contextlib.contextmanager
    def stoppable(self):
        """Ctrl-C and SIGTERM ask the run to stop at its next safe point while this block runs."""
        handlers = {sig: signal.signal(sig, self.ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.log_file:
                self.log_file.close()
            if self.reporter:
                self.reporter.close()


# =================================================================================================
# Live curves (--report-to): metrics.jsonl as it grows, in TensorBoard, Weights & Biases or Trackio
# =================================================================================================

REPORTERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}


def reporter_package(name):
    """The package --report-to `name` logs with, optional: imported only when asked for."""
    try:
        return importlib.import_module(REPORTERS[name])
    except ImportError:  # torch.utils.tensorboard raises it too when tensorboard is missing
        raise InputError(f"--report-to {name} needs the {name} package: pip install {name}") from None


class Reporter:
    """Every record Run.log writes to metrics.jsonl, sent on to --report-to as it is written:
    curves to watch while the run runs. metrics.jsonl stays the record; this is a view of it.

    The x-axis is the number of DPO steps the run has taken, over all its stages: iter_1's first
    step follows iter_0's last, so one curve runs through the whole run, and a stage's summary sits
    at its stage's last step (base: 0). (stage x 10^6 + step would stretch the axis with gaps, and
    a stage's length is not known before its pairs are.)

    Names are metrics.jsonl's. A summary repeats the step metrics' names for its stage's means
    (loss, rewards/chosen) at the x of the stage's last step, where one would overwrite the other.
    So TensorBoard keeps them in two runs, tensorboard/steps and tensorboard/stages: one chart per
    name, a line per run, as Keras shows train and validation. Weights & Biases and Trackio have
    one namespace per run, so there a summary's names begin with stages/. Each stage's grid.png is
    the image grid/<stage>, at its summary's x.
    """

    def __init__(self, kind, out, config, logged):
        """logged: the records metrics.jsonl already holds (resuming), whose steps count."""
        self.kind, self.out, self.steps = kind, out, {}  # steps: stage -> its DPO steps so far
        self.package = reporter_package(kind)
        last = {"steps": -1, "stages": -1}  # the x of each part's last logged record
        for record in logged:
            last[self.part(record)] = self.advance(record)
        if kind == "tensorboard":
            # A resumed run adds event files to the same folders. What was sent after the last
            # record metrics.jsonl kept is sent again (open_log dropped it there): purge_step
            # hides the old from TensorBoard's Python reader, and its Rust reader (the default)
            # keeps the later of two values at one step. Both show what metrics.jsonl holds.
            self.writers = {part: self.package.SummaryWriter(out / "tensorboard" / part,
                                                             purge_step=last[part] + 1)
                            for part in last}
        else:  # resumed: a new run there, its x-axis continuing where the killed one stopped
            self.package.init(project="sail", name=out.name, config=config,
                              **({"dir": str(out)} if kind == "wandb" else {}))

    @staticmethod
    def part(record):
        return "stages" if record.get("event") == "summary" else "steps"

    def advance(self, record):
        """The x of `record`. Records come in run order, so earlier stages are complete."""
        self.steps[record["stage"]] = record.get("step", self.steps.get(record["stage"], 0))
        return sum(self.steps.values())

    def log(self, record):
        x, stage, part = self.advance(record), record["stage"], self.part(record)
        metrics = {name: value for name, value in record.items() if name != "step"
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        grid = self.out / stage / "grid.png"  # evaluate() wrote it before the summary was logged
        if self.kind == "tensorboard":
            for name, value in metrics.items():
                self.writers[part].add_scalar(name, value, x)
            if part == "stages":
                with Image.open(grid) as image:
                    self.writers[part].add_image(f"grid/{stage}", np.asarray(image.convert("RGB")),
                                                 x, dataformats="HWC")
            self.writers[part].flush()  # live: it would wait up to 2 minutes
            return
        values = {("stages/" if part == "stages" else "") + name: value
                  for name, value in metrics.items()}
        if part == "stages":
            values[f"grid/{stage}"] = self.package.Image(str(grid))
        self.package.log(values, step=x)

    def close(self):
        for writer in getattr(self, "writers", {}).values():
            writer.close()
        if self.kind != "tensorboard":
            self.package.finish()


def check_new_folder(out):
    """A new run's folder must not hold anything yet, and must be creatable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: already exists and is not empty; choose a new folder")
    parent = nearest_existing(out.absolute().parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: cannot create it, {parent} is not a writable folder")


def nearest_existing(path):
    """`path`, or its nearest folder above it that exists: where the run's files will go."""
    return next(folder for folder in [path, *path.absolute().parents] if folder.exists())


def check_disk_space(out, unet, args):
    """Refuse to start a run the disk cannot hold: a UNet per stage plus the kept checkpoints."""
    unet_bytes = 4 * sum(p.numel() for p in unet.parameters())                   # fp32
    optimizer_states = 2 if args.optimizer == "adamw" else 1  # AdamW: 2 moments; Adafactor: <= 1
    checkpoints = (args.keep_checkpoints + 1) * (1 + optimizer_states)  # + 1 while the next is written
    # LoRA: checkpoints and adapters are a few MB; a stage's UNet only with --save-merged
    needed = unet_bytes * ((args.iters + 1) * (not args.lora_rank or args.save_merged)
                           + checkpoints * (not args.lora_rank))
    free = shutil.disk_usage(nearest_existing(out)).free
    if needed > free:
        raise InputError(f"--out {out}: the run writes about {needed / 1e9:.1f} GB (a model per "
                         f"stage, {args.keep_checkpoints} checkpoints) but {free / 1e9:.1f} GB "
                         "are free")


def write_config(args, run):
    """A new run's folder: config.json (what --resume reads) and, tiny world, its base model."""
    run.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        # the run folder is self-contained: its base (--tiny-model's) is always run/tiny_base
        shutil.copytree(tiny_world.BASES[args.tiny_model], run.out / "tiny_base")
    config = {**dataclasses.asdict(args), "model_path": str(run.out / "tiny_base") if args.tiny else args.model,
              "device": str(run.device), "processes": run.world, "torch": torch.__version__,
              "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    run.write_json(run.out / "config.json", config)


FILES = ("chosen", "rejected", "chosen_latents", "rejected_latents",  # a pair's file keys
         "chosen_noise", "rejected_noise")


def pair_paths(pair, change):
    """The pair with change(path) applied to each of its files (absolute <-> relative)."""
    return {**pair, **{key: change(pair[key]) for key in FILES if key in pair}}


def save_pairs_json(run, stage, self_pairs):
    """<stage>/pairs.json: the self-labelled pairs, files relative to the stage's folder."""
    folder = run.out / stage
    folder.mkdir(exist_ok=True)  # "--pairs none" labels nothing: no pairs/ folder was made
    run.write_json(folder / "pairs.json", [
        pair_paths(p, lambda path: os.path.relpath(path, folder)) for p in self_pairs])


def saved_model(out, stage, like):
    """A finished stage's denoiser (of the class of `like`) from run folder `out`, fp32 as saved."""
    return type(like).from_pretrained(Path(out) / stage / denoiser_folder(like))


def last_loss_scale(run, i):
    """fp16: iteration i starts from the loss scale the stage before ended with."""
    return json.loads((run.out / f"iter_{i - 1}" / "summary.json").read_text()).get(
        "loss_scale", 2.0 ** 16)


def restore_model(pipe, args, run, finished):
    """Resuming: the current model is the last finished stage's: its saved UNet, or with LoRA the
    base plus every finished stage's adapters."""
    if args.lora_rank:
        restore_adapters(denoiser(pipe), args, run.out, finished)
    else:
        denoiser(pipe).load_state_dict(saved_model(run.out, finished[-1], denoiser(pipe)).state_dict())


def save_model(pipe, args, folder, stage):
    """<stage>/unet (SD3, FLUX: transformer), loads with its class's from_pretrained. LoRA:
    <stage>/lora, the round's adapters (README: stage i = base + adapters 0..i), and with
    --save-merged the denoiser with every round merged, in fp32."""
    model = denoiser(pipe)
    if args.lora_rank:
        save_adapters(pipe, folder / "lora", stage)
    if args.save_merged or not args.lora_rank:
        (merged_copy(model) if args.lora_rank else model).save_pretrained(folder / denoiser_folder(model))


def explain_the_mix(args, run, stage, self_pairs, ties, n_seed, seed_pairs):
    """Say when the mixed set is not what the settings asked for, and why."""
    if run.main and args.pairs != "none" and not self_pairs:
        print(f"note: {stage}: all {ties} prompts tied: each prompt's {args.n_candidates} "
              f"Eq. 8 rewards were equal within float tolerance, so the model still denoises "
              f"exactly like its reward reference ({args.reward_ref}): training has not moved "
              f"it (lr {args.lr:.3g}, {args.dpo_steps or 'one pass of'} DPO steps). Raise "
              "--lr or --dpo-steps. Training on the seed pairs only", flush=True)
    if run.main and n_seed > seed_pairs:
        print(f"note: {stage} needs {n_seed} seed pairs but there are {seed_pairs}: drawing "
              "them with replacement", flush=True)
