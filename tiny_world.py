"""The tiny world: what sail.py aligns when there is no GPU and no weights (as a Gym environment is
to a CleanRL script). It is not SAIL, and it imports nothing from sail.py.

A world small enough for 2 CPU cores in which alignment can be *seen*:
- images: one filled shape of one colour on black, 16x16 RGB, with random size, position and
  brightness; prompts "a {colour} {shape}" (6 colours x 3 shapes = 18 prompts);
- a Stable-Diffusion-shaped pipeline (CLIP tokenizer + text encoder, AutoencoderKL, UNet, DDPM
  scheduler) built from configs and pretrained on that world: the result ships in tiny_base/;
  its rectified-flow twin (SD3-shaped, on the same autoencoder) in tiny_flow_base/, the base of
  `sail.py --tiny-model flow`;
- a simulated annotator, a fixed hand-written rule standing in for the human labellers: it prefers
  bright, large, centred paint of the prompted colour. It labelled the shipped seed pairs, and it
  scores samples after every stage so a student sees alignment as a number. SAIL never calls it:
  only the seed pairs carry its labels (and the --oracle-labels control, which says so).
Seed pairs cover only the "seen" prompts (red/green/blue x square/circle); the other 12 are
"unseen", so self-labelling has something to carry beyond the human data (SPEC section 4).
Two variant worlds, each ONE change to this one, test where self-labelling could matter (the second
evidence study, docs/evidence-2.md): "offpolicy" (the human pairs' images have a background the
base never draws) and "taste" (the annotator's taste depends on the prompt); `sail.py --tiny-world`
picks one.

    python tiny_world.py pretrain     # rebuild the tiny base; says if it is bit-identical to tiny_base/
    python tiny_world.py pretrain --model flow   # the same for the rectified-flow tiny_flow_base/
    python tiny_world.py seed-pairs   # rebuild the seed and held-out pairs; says the same of them
    python tiny_world.py seed-pairs --world taste   # a variant world's pairs (worlds/taste/)
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet, as sail.py: notes a user cannot act on
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import collections
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from safetensors.torch import load_file  # installed with diffusers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

HERE = Path(__file__).resolve().parent
BASE = HERE / "tiny_base"  # the pretrained base, shipped: `python tiny_world.py pretrain` wrote it
FLOW_BASE = HERE / "tiny_flow_base"  # its rectified-flow twin: `pretrain --model flow` wrote it
SEED_PAIRS, HELDOUT_PAIRS, PROMPTS_FILE = (HERE / "seed_pairs.json", HERE / "heldout_pairs.json",
                                           HERE / "prompts.txt")

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
SHAPES = ("square", "circle", "triangle")
PROMPTS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
SEEN = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("square", "circle")]
PROMPT_FORMAT = f"'a <colour> <shape>', colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}"
SIZE = 16                # pixels; the autoencoder halves it: latents are (4, 8, 8)
N_SEED_PAIRS = 64        # pairs in the shipped seed_pairs.json
N_HELDOUT_PAIRS = 32     # in heldout_pairs.json: judged after every stage (~1 s each, 2 cores)
PRETRAIN_STEPS = 1200    # of the shipped base
FLOW_PRETRAIN_STEPS = 1200  # of the shipped flow base
FLOW_LR = 5e-3             # its pretraining's peak learning rate

# The tiny world's two base models (sail.py --tiny-model): where each ships, and the settings a run
# on it changes in sail.py's TINY_PRESET. The flow base samples with its own flow-matching Euler
# (10 steps, CFG 4 as the DDPM base: its prompted colour and shape are right most often at 4);
# beta 300, as SD3's and FLUX's presets (5000 saturates the sigmoid on velocity errors:
# results/flow-beta/); lr: searched at that beta on seed 100 (results/flow-preset/).
BASES = {"ddpm": BASE, "flow": FLOW_BASE}
PRESETS = {"ddpm": {}, "flow": {"sampler": "euler", "beta": 300.0, "lr": 3e-5}}


# =================================================================================================
# The world: images, the annotator, fidelity
# =================================================================================================

def parse_prompt(prompt):
    """'a red circle' -> ('red', 'circle'); None if the tiny world cannot draw it."""
    words = prompt.split()
    if len(words) == 3 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES:
        return words[1], words[2]
    return None


def draw_images(prompts, generator):
    """The world's image distribution: (B, 3, 16, 16) in [0, 1], one random shape per prompt."""
    b = len(prompts)
    radius = 2.5 + 3.0 * torch.rand(b, 1, 1, generator=generator)             # (B, 1, 1) pixels
    centre = 7.5 + 6.0 * (torch.rand(b, 2, 1, 1, generator=generator) - 0.5)  # (B, 2, 1, 1)
    brightness = 0.4 + 0.6 * torch.rand(b, 1, 1, 1, generator=generator)       # (B, 1, 1, 1)
    grid = torch.arange(SIZE, dtype=torch.float32)
    dy = grid.view(1, -1, 1) - centre[:, 0]                                    # (B, 16, 1)
    dx = grid.view(1, 1, -1) - centre[:, 1]                                    # (B, 1, 16)
    masks = {"square": (dx.abs() <= radius) & (dy.abs() <= radius),
             "circle": dx ** 2 + dy ** 2 <= radius ** 2,
             "triangle": (dy.abs() <= radius) & (dx.abs() <= (dy + radius) / 2)}  # each (B, 16, 16)
    colour, shape = zip(*(parse_prompt(p) for p in prompts))
    mask = torch.stack([masks[s][i] for i, s in enumerate(shape)]).float()   # (B, 16, 16)
    rgb = torch.tensor([COLOURS[c] for c in colour]).view(b, 3, 1, 1)        # (B, 3, 1, 1)
    return brightness * rgb * mask.unsqueeze(1)                              # (B, 3, 16, 16)


def annotator_score(images, prompts):
    """The simulated human: 0-100, higher for bright, large, centred paint of the prompted colour.

    score = 100 * sum_pixels w(p) * exp(-||pixel - colour||^2 / 0.2), w a centred Gaussian (sum 1).
    """
    rgb = torch.tensor([COLOURS[parse_prompt(p)[0]] for p in prompts])
    match = torch.exp(-((images - rgb.view(-1, 3, 1, 1)) ** 2).sum(1) / 0.2)  # (B, 16, 16)
    grid = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    weight = torch.exp(-(grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) / (2 * 4.0 ** 2))
    return 100 * (match * weight / weight.sum()).sum((1, 2))                   # (B,)


def fidelity(images, prompts):
    """Does each image still show its prompt? (B,) bool: right colour, right shape, not a blob.

    Tracked beside the annotator score, because a score far above the data's range bought with a
    screen full of paint is reward hacking, not alignment (SPEC section 4).
    """
    painted = images.amax(1) > 0.25                                             # (B, 16, 16)
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in names])                         # (6, 3)
    ok = []
    for image, mask, prompt in zip(images, painted, prompts):
        colour, shape = parse_prompt(prompt)
        area = int(mask.sum())
        if area < 9 or area > 0.6 * SIZE ** 2:  # the world draws 16..144 pixels (r in 2.5..5.5)
            ok.append(False)
            continue
        mean_rgb = image[:, mask].mean(1)                                       # (3,)
        nearest_colour = names[int(F.cosine_similarity(palette, mean_rgb[None]).argmax())]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = area / float(box)  # square ~1.0, circle ~0.79, triangle ~0.5 of its bounding box
        nearest_shape = min(zip((1.0, 0.76, 0.5), SHAPES), key=lambda fs: abs(fs[0] - fill))[1]
        ok.append(nearest_colour == colour and nearest_shape == shape)
    return torch.tensor(ok)


def sample_scores(images, prompts):
    """What each of a stage's samples (B, 3, 16, 16) earns: the annotator's score (all, seen and
    unseen prompts) and whether it still shows its prompt (fidelity, 0 or 1)."""
    score = current.annotator(images, prompts)
    seen = torch.tensor([p in current.seen for p in prompts])
    return {"annotator": score, "annotator/seen": score[seen], "annotator/unseen": score[~seen],
            "fidelity": fidelity(images, prompts).float()}


# =================================================================================================
# The variant worlds of the second evidence study (docs/evidence-2.md): each ONE change to the above
# =================================================================================================

def offpolicy_images(prompts, generator):
    """The off-policy world's human images: the world's shapes on a dim, textured grey background
    that the base model never draws, as Pick-a-Pic's images come from other generators than the
    model being aligned. Grey stays below 0.25, so fidelity's paint mask ignores it, and the
    annotator, which scores closeness to the prompted colour, gives it almost nothing."""
    images = draw_images(prompts, generator)                                   # (B, 3, 16, 16)
    level = 0.05 + 0.12 * torch.rand(len(prompts), 1, 1, 1, generator=generator)   # (B, 1, 1, 1)
    texture = 0.04 * torch.rand(len(prompts), 1, SIZE, SIZE, generator=generator)  # (B, 1, 16, 16)
    background = (images.amax(1, keepdim=True) == 0).float()                   # (B, 1, 16, 16)
    return images + background * (level + texture)


# The taste world: one preference per word of the prompt. Seed pairs cover 6 of the 18 prompts,
# each colour once and each shape twice: every preference is in the human data, but the other 12
# prompts are new combinations of them.
SMALL_SHAPES = ("square",)                  # liked small; circles and triangles liked large
DIM_COLOURS = ("green", "yellow", "cyan")   # liked at DIM brightness; red, blue, magenta bright
DIM = 0.5                                   # inside the range the world draws (0.4 to 1)
TASTE_SEEN = ["a red square", "a green circle", "a blue triangle", "a yellow square",
              "a magenta circle", "a cyan triangle"]


def centred_weight(sigma):
    """(16, 16): a Gaussian centred on the image, summing to 1."""
    grid = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    weight = torch.exp(-(grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) / (2 * sigma ** 2))
    return weight / weight.sum()


def taste_score(images, prompts):
    """The taste world's annotator: the shapes world's, with brightness and size preferences that
    depend on the prompt. Paint is matched against level x colour (dividing the pixel by the
    level: 1, or DIM for a dim colour). Large shapes weigh paint by the centred Gaussian (sigma
    4 px) as before, so more paint scores more; small ones by a centre-surround weight (sigma 1.5
    minus sigma 4, summing to 0), so paint beyond ~3 px from the centre costs (below 0 is possible).

    score = 100 * sum_pixels w_shape(p) * exp(-||pixel / level_colour - colour||^2 / 0.2)
    """
    colour, shape = zip(*(parse_prompt(p) for p in prompts))
    rgb = torch.tensor([COLOURS[c] for c in colour]).view(-1, 3, 1, 1)
    level = torch.tensor([DIM if c in DIM_COLOURS else 1.0 for c in colour]).view(-1, 1, 1, 1)
    match = torch.exp(-((images / level - rgb) ** 2).sum(1) / 0.2)            # (B, 16, 16)
    large, small = centred_weight(4.0), centred_weight(1.5) - centred_weight(4.0)
    weight = torch.stack([small if s in SMALL_SHAPES else large for s in shape])  # (B, 16, 16)
    return 100 * (match * weight).sum((1, 2))                                  # (B,)


# A world: where its human pairs live, how their images are drawn, who labels them, which prompts
# they cover. The shapes world is the one every earlier figure was measured in.
World = collections.namedtuple("World", "folder human_images annotator seen")
WORLDS = {"shapes": World(HERE, draw_images, annotator_score, SEEN),
          "offpolicy": World(HERE / "worlds" / "offpolicy", offpolicy_images, annotator_score, SEEN),
          "taste": World(HERE / "worlds" / "taste", draw_images, taste_score, TASTE_SEEN)}
current = WORLDS["shapes"]  # the world of the run in this process: plumbing's read_data sets it


def use_world(name):
    """From now on, score samples and check self-labels with world `name`'s annotator."""
    global current  # one run at a time per process, as one base model
    current = WORLDS[name]


def human_pairs(args):
    """(seed pairs, held-out pairs) of a run in world `args.tiny_world`: a variant world's own
    files replace the shapes world's shipped ones (other images, or another annotator's labels);
    files given by hand are kept."""
    folder = WORLDS[args.tiny_world].folder
    return tuple(str(folder / shipped.name) if path and Path(path).resolve() == shipped else path
                 for path, shipped in ((args.seed_pairs, SEED_PAIRS),
                                       (args.heldout_pairs, HELDOUT_PAIRS)))


# =================================================================================================
# The annotator controls: is a self-labelled pair what the annotator would say?
# =================================================================================================

def read_png(path):
    """A 16x16 PNG -> (3, 16, 16) in [0, 1]."""
    with Image.open(path) as image:
        pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).float() / 255


def write_png(image, path):
    """(3, H, W) in [0, 1] -> PNG."""
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)


def annotator_agrees(pairs):
    """(P,) bool: does the hidden annotator prefer each pair's chosen image to its rejected one?"""
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = (torch.stack([read_png(p[key]) for p in pairs])
                        for key in ("chosen", "rejected"))                      # (P, 3, 16, 16)
    return current.annotator(chosen, prompts) > current.annotator(rejected, prompts)


def controls(self_pairs, oracle_labels):
    """Hidden from SAIL: does the annotator agree with the self-labels? And the all-labels
    control (--oracle-labels): the annotator orders each pair instead. -> (pairs, metrics)"""
    if not self_pairs:
        return self_pairs, {}
    agreement = {"self_label_acc": annotator_agrees(self_pairs).float().mean().item()}
    return (annotator_relabel(self_pairs) if oracle_labels else self_pairs), agreement


def annotator_relabel(pairs):
    """The all-labels control: the same pairs, ordered by the hidden annotator instead of Eq. 8.

    A flipped pair keeps Eq. 8's rewards with their images, so its confidence becomes 1 - p.
    """
    def flipped(pair):
        swapped = dict(pair)
        for end in ("", "_latents", "_noise"):  # each image keeps its latents and noise files
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


# =================================================================================================
# The tiny base model: configs, offline tokenizer, pretraining
# =================================================================================================

def tokenizer(folder):
    """A word-level CLIPTokenizer for the world's words, built offline.

    BPE merges spell each word letter by letter ('r e', 're d</w>'), so every word becomes one
    token. (A CLIPTokenizer from a hub id, offline, can silently come back with 2 tokens.)
    """
    words = ["a", *COLOURS, *SHAPES]
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
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def build_pipeline(folder):
    """An untrained Stable-Diffusion-shaped pipeline (about 0.9M parameters) from configs; the
    tokenizer's files go to `folder`. Random weights from torch's global RNG."""
    words = tokenizer(folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=8, bos_token_id=words.bos_token_id,
        eos_token_id=words.eos_token_id, pad_token_id=words.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)
    # SD 1.5's noise schedule (scaled_linear 0.00085..0.012 over T = 1000 steps)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=words,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def build_flow_pipeline(folder, vae_folder=BASE / "vae"):
    """An untrained SD3-shaped rectified-flow pipeline (about 0.6M parameters) around the DDPM
    base's pretrained autoencoder (loaded, not retrained: the same latent space, so the same world
    for the annotator). Two CLIP text encoders with projections as SD3's (no T5: SD3 without T5
    pads with zeros), a joint-attention transformer on 1x1 latent patches, flow-matching Euler.
    Random weights from torch's global RNG; the tokenizer's files go to `folder`."""
    words = tokenizer(folder)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=8, projection_dim=32,
        bos_token_id=words.bos_token_id, eos_token_id=words.eos_token_id,
        pad_token_id=words.pad_token_id)) for _ in range(2)]
    transformer = SD3Transformer2DModel(  # text: both CLIPs' 32-wide states side by side (64)
        sample_size=SIZE // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=SIZE // 2)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: no global draw
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(vae_folder))  # (no path saved)
    vae.load_state_dict(load_file(Path(vae_folder) / "diffusion_pytorch_model.safetensors"))
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds it when decoding
    # shift 1: SD3's shift of 3 moves training and sampling towards noise for 1024 px images, whose
    # many pixels keep the picture recognisable at more noise (Esser et al. 2024, section 5.3.2:
    # the shift grows with resolution, 1 at their smallest); our latents have 64 positions
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=clips[0], tokenizer=words, text_encoder_2=clips[1],
                                    tokenizer_2=words, text_encoder_3=None, tokenizer_3=None)


def world_batch(size, generator):
    """`size` random prompts of the world and an image of each, in [-1, 1]: (size, 3, 16, 16)."""
    prompts = [PROMPTS[i] for i in torch.randint(len(PROMPTS), (size,), generator=generator)]
    return prompts, draw_images(prompts, generator) * 2 - 1


def cosine_schedule(optimizer, steps, warmup):
    """Learning-rate factor: linear warm-up, then cosine decay to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / warmup)
                                             * 0.5 * (1 + math.cos(math.pi * s / steps)))


def pretrain_autoencoder(vae, steps, generator):
    """Reconstruction + a tiny KL term (SD's VAE recipe, scaled down). Fewer or slower steps left
    blurry reconstructions, which cap what the UNet can ever draw."""
    optimizer = torch.optim.AdamW(vae.train().parameters(), lr=3e-3)
    schedule = cosine_schedule(optimizer, steps, warmup=1)
    for _ in tqdm(range(steps), desc="tiny world: pretrain autoencoder", leave=False):
        images = world_batch(32, generator)[1]
        posterior = vae.encode(images).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    # scaling factor = 1 / std of the latents, so x_0 has unit variance (how SD chose 0.18215)
    latents = vae.encode(world_batch(512, generator)[1]).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


def pretrain_denoiser(pipe, steps, generator):
    """Text encoder + UNet: the plain denoising loss ||eps - unet(x_t, t, y)||^2 with 15% empty
    prompts so classifier-free guidance works; AdamW, warm-up + cosine, clip 1. Measured (DDIM 10
    steps, CFG 4): the prompted colour and shape in 25% of samples after 600 steps, 65% after 1200."""
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=6e-3)
    schedule = cosine_schedule(optimizer, steps, warmup=30)
    pipe.unet.train()
    pipe.text_encoder.train()
    for _ in tqdm(range(steps), desc="tiny world: pretrain base model", leave=False):
        prompts, images = world_batch(32, generator)
        prompts = ["" if torch.rand(1, generator=generator) < 0.15 else p for p in prompts]
        posterior_noise = torch.randn(32, 4, 8, 8)  # global RNG, seeded in pretrain()
        with torch.no_grad():
            posterior = pipe.vae.encode(images).latent_dist
            x0 = (posterior.mean + posterior.std * posterior_noise) * pipe.vae.config.scaling_factor
        text, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (32,), generator=generator)
        a_t = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise                             # (32, 4, 8, 8)
        prediction = pipe.unet(x_t, t, encoder_hidden_states=text).sample
        loss = ((prediction - noise) ** 2).mean(dim=(1, 2, 3)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)


def pretrain_flow(pipe, steps, generator, lr=FLOW_LR):
    """Text encoders + transformer, rectified flow as SD3 trains: x_t = (1 - sigma) x_0 + sigma eps,
    the loss ||(eps - x_0) - v(x_t, sigma, y)||^2 with sigma from a logit-normal(0, 1) draw of the
    scheduler's table (Esser et al. 2024); 15% empty prompts, AdamW, warm-up + cosine, clip 1, as
    pretrain_denoiser."""
    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters(),
              *pipe.text_encoder_2.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = cosine_schedule(optimizer, steps, warmup=30)
    for part in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        part.train()
    vae, table = pipe.vae, pipe.scheduler
    for _ in tqdm(range(steps), desc="tiny world: pretrain flow base", leave=False):
        prompts, images = world_batch(32, generator)
        prompts = ["" if torch.rand(1, generator=generator) < 0.15 else p for p in prompts]
        posterior_noise = torch.randn(32, 4, 8, 8)  # global RNG, seeded in pretrain()
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            x0 = (posterior.mean + posterior.std * posterior_noise - vae.config.shift_factor) \
                * vae.config.scaling_factor                                          # (32, 4, 8, 8)
        text, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                do_classifier_free_guidance=False)
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(32, generator=generator))                     # logit-normal
        t = (u * table.config.num_train_timesteps).long().clamp(max=table.config.num_train_timesteps - 1)
        sigma = table.sigmas[t].view(-1, 1, 1, 1)                                   # (32, 1, 1, 1)
        x_t = (1 - sigma) * x0 + sigma * noise                                      # (32, 4, 8, 8)
        prediction = pipe.transformer(x_t, timestep=table.timesteps[t], encoder_hidden_states=text,
                                      pooled_projections=pooled).sample
        loss = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    for part in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        part.eval().requires_grad_(False)


def pretrain_flow_base(out, steps=FLOW_PRETRAIN_STEPS, seed=0):
    """Teach a fresh SD3-shaped pipeline the world on the shipped base's autoencoder; save to `out`."""
    torch.manual_seed(seed)  # the configs' random initialisation, then the posteriors' samples
    generator = torch.Generator().manual_seed(seed)  # the world's images, prompts, t and noise
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_flow_pipeline(scratch)
        pretrain_flow(pipe, steps, generator)
        pipe.save_pretrained(out)


def pretrain(out, steps=PRETRAIN_STEPS, seed=0):
    """Teach a fresh tiny pipeline its world, as SD was taught on LAION (autoencoder, then UNet),
    and save it to `out` as a diffusers folder in safetensors."""
    torch.manual_seed(seed)  # the configs' random initialisation, then the posteriors' samples
    generator = torch.Generator().manual_seed(seed)  # the world's images, prompts, t and noise
    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_pipeline(scratch)
        pretrain_autoencoder(pipe.vae, steps, generator)
        pretrain_denoiser(pipe, steps, generator)
        pipe.save_pretrained(out)


# =================================================================================================
# The human data: seed pairs and held-out pairs, labelled by the annotator
# =================================================================================================

def write_seed_pairs(folder, seed=0, world="shapes"):
    """Write a world's human pairs: its images of its seen prompts, labelled by its annotator.

    Like Pick-a-Pic, two images of the same prompt; the annotator picks the one it prefers, and
    near-ties (< 1 point apart) are dropped, as Diffusion-DPO drops tied human labels. The seed set
    goes to seed_pairs.json; the pairs drawn next to heldout_pairs.json: never trained on, they
    measure how often the model's own judgement agrees with the annotator.
    """
    folder = Path(folder)
    (folder / "seed_images").mkdir(parents=True)
    human_images, annotator, seen = (WORLDS[world].human_images, WORLDS[world].annotator,
                                     WORLDS[world].seen)
    generator = torch.Generator().manual_seed(seed)
    for file, prefix, count in (("seed_pairs.json", "", N_SEED_PAIRS),
                                ("heldout_pairs.json", "heldout_", N_HELDOUT_PAIRS)):
        pairs = []
        while len(pairs) < count:
            prompt = seen[len(pairs) % len(seen)]
            images = human_images([prompt, prompt], generator)                  # (2, 3, 16, 16)
            score = annotator(images, [prompt, prompt])
            if abs(score[0] - score[1]) < 1.0:
                continue
            winner = int(score.argmax())
            names = [f"seed_images/{prefix}{len(pairs):03d}_{key}.png" for key in ("chosen", "rejected")]
            write_png(images[winner], folder / names[0])
            write_png(images[1 - winner], folder / names[1])
            pairs.append({"prompt": prompt, "chosen": names[0], "rejected": names[1]})
        (folder / file).write_text(json.dumps(pairs, indent=1) + "\n")
        print(f"wrote {len(pairs)} pairs to {folder / file}")


# =================================================================================================
# Command line: rebuild what ships, and say whether it came out the same
# =================================================================================================

def differences(new, shipped):
    """Files of folder `new` that differ from `shipped`: weights compared tensor by tensor
    (the largest |difference|), any other file byte by byte."""
    found = []
    for path in sorted(p for p in Path(new).rglob("*") if p.is_file()):
        other = Path(shipped) / path.relative_to(new)
        if not other.exists():
            found.append(f"{other} is missing")
        elif path.suffix == ".safetensors":
            a, b = load_file(path), load_file(other)
            gap = max((a[k] - b[k]).abs().max().item() if k in a and k in b and a[k].shape == b[k].shape
                      else math.inf for k in a.keys() | b.keys())  # a missing tensor differs too
            if gap > 0:
                found.append(f"{path.relative_to(new)}: largest |weight difference| {gap:.3g}")
        elif path.read_bytes() != other.read_bytes():
            found.append(f"{path.relative_to(new)} differs")
    return found


def report(new, shipped, what):
    found = differences(new, shipped)
    if not found:
        print(f"{what}: bit-identical to the shipped {shipped}")
    else:
        print(f"{what}: differs from the shipped {shipped} (another CPU or torch version can round "
              f"differently):\n  " + "\n  ".join(found))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tiny_world.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("pretrain", help="pretrain the tiny base (about 3 min on 2 CPU "
                               "cores) and compare it with the shipped tiny_base/ (or --model flow)")
    make.add_argument("--model", choices=("ddpm", "flow"), default="ddpm", help="ddpm: the SD-shaped "
                      "tiny_base/; flow: the SD3-shaped rectified-flow tiny_flow_base/ (about 3 min "
                      "on 1 core; it reuses tiny_base/'s autoencoder) (default: %(default)s)")
    make.add_argument("--out", default=None,
                      help="folder to write, must not exist (to replace the shipped base: "
                           "rm -r tiny_base, then --out tiny_base) (default: <base>-rebuilt)")
    make.add_argument("--steps", type=int, default=None,
                      help=f"steps of the autoencoder and of the UNet each (default: "
                           f"{PRETRAIN_STEPS}); flow: of the transformer (default: {FLOW_PRETRAIN_STEPS})")
    make.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of every "
                      "draw; the shipped base: 0 (default: %(default)s)")
    pairs = commands.add_parser("seed-pairs", help="draw and label the seed and held-out pairs, "
                                "and compare them with the shipped ones")
    pairs.add_argument("--out", default="seed-pairs-rebuilt",
                       help="folder to write, must not exist (default: %(default)s)")
    pairs.add_argument("--seed", type=int, default=0, help="seed of every draw; the shipped pairs: 0 "
                       "(default: %(default)s)")
    pairs.add_argument("--world", choices=WORLDS, default="shapes", help="whose pairs: the shapes "
                       "world's ship beside this file, a variant's in worlds/<world>/ (default: "
                       "%(default)s)")
    args = parser.parse_args(argv)
    if args.command == "pretrain":  # the defaults of the base it builds
        shipped = FLOW_BASE if args.model == "flow" else BASE
        args.out = args.out or f"{shipped.name}-rebuilt"
        args.steps = args.steps or (FLOW_PRETRAIN_STEPS if args.model == "flow" else PRETRAIN_STEPS)
    out = Path(args.out)
    if out.exists():
        print(f"error: --out {out} already exists; choose a new folder", file=sys.stderr)
        return 2
    started = time.time()
    if args.command == "pretrain" and args.model == "flow":
        pretrain_flow_base(out, args.steps, args.seed)
        print(f"pretrained the tiny flow base in {time.time() - started:.0f} s: {out}")
        if out.resolve() != FLOW_BASE and args.steps == FLOW_PRETRAIN_STEPS and args.seed == 0:
            report(out, FLOW_BASE, "the tiny flow base")
    elif args.command == "pretrain":
        pretrain(out, args.steps, args.seed)
        print(f"pretrained the tiny base in {time.time() - started:.0f} s: {out}")
        if out.resolve() != BASE and args.steps == PRETRAIN_STEPS and args.seed == 0:
            report(out, BASE, "the tiny base")
    else:
        write_seed_pairs(out, args.seed, args.world)
        if args.seed == 0:
            report(out, WORLDS[args.world].folder, "the seed and held-out pairs"
                   + ("" if args.world == "shapes" else f" of the {args.world} world"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
