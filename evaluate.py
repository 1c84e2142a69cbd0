"""Score a SAIL run's models like the paper's tables: fixed prompts, fixed seeds, its sampler.

    python evaluate.py runs/tiny-20261125-221503                 # tiny world: hidden annotator
    python evaluate.py runs/sd-... --prompts test.txt --metrics pickscore
    python evaluate.py runs/sd-... --models base,iter_3 --seeds 2

Every model of the run is scored (base, step 0 = iter_0, each iteration's saved UNet), or those
named by --models (the base always: it is what the win rates compare with). Images are drawn
with the run's own sampler settings (config.json), the same noise for every model. One row per
model in <out>/results.md and .csv (default <run>/eval-<time>); per metric:
    mean         over images, with a 95% bootstrap interval over prompts (prompts resampled with
                 replacement, 1000 times, seeds kept with their prompt)
    win vs base  the fraction of (prompt, seed) images that score higher than the base model's
                 image of the same prompt and seed (same noise), ties counted half; its interval
                 by the same bootstrap over prompts. The base's own is 0.5 by definition.

Prompts: --prompts, a text file (one per line, # comments), or --pickapic, the captions of a
Pick-a-Pic v2 split (the paper's test prompts: --pickapic-split test_unique) read through
pickapic.py's reader from parquet shards or a `datasets` folder / hub name, unique, in order.

Metrics (--metrics, comma-separated); a file flag left out means the hub, when online:
    annotator    tiny world only: the hidden simulated human (0-100), also on seen and unseen
                 prompts, and fidelity (the image still shows its prompt)
    pickscore    PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(text, image) of the
                 PickScore_v1 CLIP model with the CLIP-ViT-H-14 processor. --pickscore-model and
                 --pickscore-processor take hub ids (the defaults) or local folders.
    aesthetic    the LAION aesthetic predictor (improved-aesthetic-predictor, sac+logos+ava1-l14-
                 linearMSE.pth): a linear MLP on the L2-normalised CLIP ViT-L/14 image embedding.
                 --aesthetic-head is that .pth file (not on the hub: LAION's repository
                 christophschuhmann/improved-aesthetic-predictor, or Diffusion-DPO's
                 utils/aesthetics_model/); --aesthetic-clip the CLIP model.
    imagereward  ImageReward v1.0 (Xu et al. 2023), rebuilt on transformers' BLIP: its MLP on
                 BLIP's text encoder's [CLS] feature (the prompt read with cross-attention to the
                 ViT-L/16 image features), standardised. --imagereward-model ImageReward.pt,
                 --imagereward-config med_config.json (both THUDM/ImageReward on the hub),
                 --imagereward-tokenizer a bert-base-uncased folder or hub id.
    hps          HPSv2 (Wu et al. 2023): 100 * cos(text, image) of the HPS-tuned open_clip
                 ViT-H-14, its weights renamed into transformers' CLIP (no open_clip needed;
                 --hps-clip gives the config and processor). --hps-checkpoint HPS_v2_compressed.pt
                 (or HPS_v2.1_compressed.pt for HPSv2.1; both xswu/HPSv2 on the hub).
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import plumbing  # noqa: E402
import sail  # noqa: E402
import tiny_world  # noqa: E402

METRICS = ("annotator", "pickscore", "aesthetic", "imagereward", "hps")
RESAMPLES = 1000  # bootstrap resamples of the prompts


class ClipScorer:
    """A CLIP model and its processor, from hub ids or folders: what PickScore, the aesthetic
    score and HPS start from. With `weights`, only the model's config is read, and those weights
    (another checkpoint's, in transformers' names) go into that architecture."""

    def __init__(self, model, processor, device, name, weights=None):
        from transformers import AutoConfig, AutoModel, AutoProcessor
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            if weights is None:
                self.model = AutoModel.from_pretrained(model)
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(model))
                self.model.load_state_dict(weights)
        except Exception as error:
            raise sail.InputError(f"cannot load the {name} model {model} / processor "
                                  f"{processor}: {plumbing.first_line(error)}")
        self.model.eval().to(device)
        self.device = device

    @staticmethod
    def features(output):  # transformers 5 returns an output object, 4.x a tensor
        return getattr(output, "pooler_output", output)

    def unit(self, embedding):
        return embedding / embedding.norm(dim=-1, keepdim=True)

    def image_embedding(self, images):
        """images (B, 3, H, W) in [0, 1] -> (B, D) CLIP image embeddings of norm 1."""
        pixels = self.processor(images=[plumbing.to_pil(image) for image in images],
                                return_tensors="pt").to(self.device)
        return self.unit(self.features(self.model.get_image_features(**pixels)))

    def cosine(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], one prompt each -> (B,) cos(text, image)."""
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77,
                              return_tensors="pt").to(self.device)
        image_emb = self.image_embedding(images)                                 # (B, D)
        text_emb = self.unit(self.features(self.model.get_text_features(**text)))  # (B, D)
        return (image_emb * text_emb).sum(-1)


class PickScore(ClipScorer):
    """PickScore: s(y, x) = logit_scale.exp() * cos(text_embedding(y), image_embedding(x))."""

    def __init__(self, model, processor, device):
        super().__init__(model, processor, device, "PickScore")

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], one prompt each -> (B,) scores."""
        return self.model.logit_scale.exp() * self.cosine(images, prompts)


def local_or_hub(path, flag, repo, filename):
    """A scorer's file: the local path given with `flag`, or else downloaded from the hub."""
    if path is not None:
        if not Path(path).is_file():
            raise sail.InputError(f"{flag} {path}: no such file")
        return path
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename)
    except Exception as error:  # offline, or no such repository or file
        raise sail.InputError(f"{flag} not given and {repo}/{filename} cannot be downloaded "
                              f"({plumbing.first_line(error)}): pass a local file with {flag}")


def linear_mlp(weights, size, what):
    """improved-aesthetic-predictor's head, which ImageReward reuses: Linear(size, 1024), Dropout,
    Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), no
    activations (its "linearMSE" heads); `weights` under those nn.Sequential indices."""
    mlp = torch.nn.Sequential(
        torch.nn.Linear(size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    try:
        mlp.load_state_dict(weights)
    except RuntimeError as error:
        raise sail.InputError(f"{what}: {plumbing.first_line(error)}")
    return mlp.eval()


def load_weights(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise sail.InputError(f"cannot load {what} {path}: {plumbing.first_line(error)}")


class Aesthetic(ClipScorer):
    """LAION aesthetic score: MLP(image_embedding / |image_embedding|), a CLIP ViT-L/14 embedding
    and `linear_mlp`, whose weights the .pth holds under the keys layers.<index>."""

    def __init__(self, clip, head, device):
        if head is None:
            raise sail.InputError("--metrics aesthetic needs --aesthetic-head, the predictor's .pth "
                                  "(github.com/christophschuhmann/improved-aesthetic-predictor, or "
                                  "Diffusion-DPO's utils/aesthetics_model/)")
        super().__init__(clip, clip, device, "aesthetic predictor's CLIP")
        weights = load_weights(head, "the aesthetic predictor's head")
        self.mlp = linear_mlp({k.removeprefix("layers."): v for k, v in weights.items()},
                              self.model.config.projection_dim,
                              f"cannot load the aesthetic predictor's head {head}").to(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1] -> (B,) scores (the prompts are not used)."""
        return self.mlp(self.image_embedding(images)).squeeze(-1)


def blip_vision_key(key):
    """BLIP's vit.py name -> transformers' BlipVisionModel name (what transformers' BLIP
    conversion script renames)."""
    if key.startswith("norm."):
        return "post_layernorm." + key[len("norm."):]
    for theirs, ours in (("blocks.", "encoder.layers."), (".norm1", ".layer_norm1"),
                         (".norm2", ".layer_norm2"), ("attn.proj", "self_attn.projection"),
                         ("attn.qkv", "self_attn.qkv"), ("cls_token", "embeddings.class_embedding"),
                         ("pos_embed", "embeddings.position_embedding"),
                         ("patch_embed.proj", "embeddings.patch_embedding")):
        key = key.replace(theirs, ours)
    return key


class ImageReward:
    """ImageReward (ImageReward/ImageReward.py, ImageReward.score):
        r(y, x) = (MLP(text_encoder(tokens(y) | ViT(x))[:, 0]) - 0.16717362830052426) / 1.0333394966054072
    BLIP's BERT text encoder reads the prompt (bert-base-uncased tokens, padded to 35) with
    cross-attention to all ViT tokens; the MLP (`linear_mlp`) reads its first ([CLS]) feature.
    Rebuilt on transformers' BlipVisionModel and BlipTextModel, which port BLIP's vit.py and
    med.py; the official checkpoint's weights are renamed into them. The image goes through
    CLIP's preprocessing (bicubic resize of the short side, centre crop, CLIP mean and std), as
    ImageReward's _transform does. The image size and the ViT's width and depth are read from
    the checkpoint; its heads are width / 64, as in BLIP's ViT-B (768/12) and ViT-L (1024/16).
    """

    MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.__init__

    def __init__(self, checkpoint, med_config, tokenizer, device):
        from transformers import (AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig,
                                  BlipVisionModel, CLIPImageProcessor)
        checkpoint = local_or_hub(checkpoint, "--imagereward-model", "THUDM/ImageReward",
                                  "ImageReward.pt")
        med_config = local_or_hub(med_config, "--imagereward-config", "THUDM/ImageReward",
                                  "med_config.json")
        weights = load_weights(checkpoint, "the ImageReward checkpoint")
        vision = {blip_vision_key(k[len("blip.visual_encoder."):]): v for k, v in weights.items()
                  if k.startswith("blip.visual_encoder.")}
        text = {k[len("blip.text_encoder."):]: v for k, v in weights.items()
                if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
        try:
            med = json.loads(Path(med_config).read_text())
            width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
            positions = vision["embeddings.position_embedding"].shape[1]
            image_size = round((positions - 1) ** 0.5) * patch
            self.vision = BlipVisionModel(BlipVisionConfig(
                hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.")),
                num_attention_heads=width // 64, image_size=image_size, patch_size=patch,
                hidden_act="gelu", layer_norm_eps=1e-6))       # vit.py: nn.GELU, LayerNorm(eps=1e-6)
            self.text = BlipTextModel(BlipTextConfig(
                vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                intermediate_size=med["intermediate_size"],
                num_hidden_layers=med["num_hidden_layers"],
                num_attention_heads=med["num_attention_heads"],
                max_position_embeddings=med["max_position_embeddings"],
                layer_norm_eps=med["layer_norm_eps"], hidden_act=med["hidden_act"],
                encoder_hidden_size=width, is_decoder=True), add_pooling_layer=False)
            self.vision.load_state_dict(vision)
            self.text.load_state_dict(text)  # is_decoder=True builds the cross-attention layers
        except (KeyError, ValueError, RuntimeError, OSError) as error:
            raise sail.InputError(f"cannot load the ImageReward model {checkpoint} with "
                                  f"{med_config}: {plumbing.first_line(error)}")
        self.mlp = linear_mlp({k[len("mlp.layers."):]: v for k, v in weights.items()
                               if k.startswith("mlp.layers.")}, med["hidden_size"],
                              f"cannot load the ImageReward head of {checkpoint}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as error:
            raise sail.InputError(f"cannot load the ImageReward tokenizer {tokenizer} "
                                  f"(--imagereward-tokenizer): {plumbing.first_line(error)}")
        self.processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
        for module in (self.vision, self.text, self.mlp):
            module.eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], one prompt each -> (B,) rewards."""
        pixels = self.processor(images=[plumbing.to_pil(image) for image in images],
                                return_tensors="pt")["pixel_values"].to(self.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state         # (B, 1+N, D)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                              return_tensors="pt").to(self.device)
        # is_decoder=False: BERT's bidirectional self-attention, as BLIP's encoder mode
        features = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                             encoder_hidden_states=image_tokens, is_decoder=False
                             ).last_hidden_state[:, 0]                              # (B, 768)
        return ((self.mlp(features) - self.MEAN) / self.STD).squeeze(-1)


def open_clip_name(key):
    """open_clip's CLIP name (OpenAI's layout) -> transformers' CLIPModel name, as transformers'
    convert_clip_original_pytorch_to_hf.py maps them (its projections and in_proj: below)."""
    tower = "vision_model." if key.startswith("visual.") else "text_model."
    key = key.removeprefix("visual.")
    for theirs, ours in (("transformer.resblocks.", "encoder.layers."), (".ln_1", ".layer_norm1"),
                         (".ln_2", ".layer_norm2"), (".attn", ".self_attn"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
                         ("conv1", "embeddings.patch_embedding"),
                         ("class_embedding", "embeddings.class_embedding"),
                         ("token_embedding", "embeddings.token_embedding"),
                         ("positional_embedding", "embeddings.position_embedding.weight"),
                         ("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm"),
                         ("ln_final", "final_layer_norm")):
        key = key.replace(theirs, ours)
    return key if key == "logit_scale" else tower + key


def open_clip_weights(state_dict):
    """An open_clip CLIP state_dict -> transformers' CLIPModel's: attention's in_proj split into
    q, k, v; the projections transposed (open_clip computes x @ proj, a Linear x @ W.T)."""
    weights = {}
    for key, value in state_dict.items():
        if key.endswith("attn_mask"):  # open_clip's causal mask, a buffer
            continue
        if key in ("visual.proj", "text_projection"):
            weights[("visual_projection" if key == "visual.proj" else key) + ".weight"] = value.T
        elif key.endswith(("in_proj_weight", "in_proj_bias")):
            stem, kind = key.rsplit(".in_proj_", 1)                         # kind: weight, bias
            for name, part in zip("qkv", value.chunk(3)):
                weights[f"{open_clip_name(stem)}.{name}_proj.{kind}"] = part
        else:
            weights[open_clip_name(key)] = value
    return weights


class HPS(ClipScorer):
    """HPSv2 / HPSv2.1 (hpsv2/img_score.py, score): s(y, x) = 100 * cos(text_features(y),
    image_features(x)) of an open_clip ViT-H-14 whose weights are the HPS checkpoint's
    state_dict; the official code reports the cosine itself, the paper's tables 100 times it.
    Rebuilt as transformers' CLIPModel (the architecture and processor of --hps-clip, default
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model HPS was fine-tuned from: only its config and
    processor files are read) with the checkpoint's weights renamed into it (`open_clip_weights`):
    the same transformer, the same CLIP preprocessing and BPE tokenizer as open_clip's."""

    def __init__(self, checkpoint, clip, device):
        checkpoint = local_or_hub(checkpoint, "--hps-checkpoint", "xswu/HPSv2",
                                  "HPS_v2_compressed.pt")
        weights = load_weights(checkpoint, "the HPS checkpoint")
        if not isinstance(weights, dict) or "state_dict" not in weights:
            raise sail.InputError(f"--hps-checkpoint {checkpoint}: no state_dict in it")
        super().__init__(clip, clip, device, f"HPS ({checkpoint})",
                         weights=open_clip_weights(weights["state_dict"]))
        config = self.model.config
        if {config.text_config.hidden_act, config.vision_config.hidden_act} != {"gelu"}:
            raise sail.InputError(f"--hps-clip {clip}: its config's hidden_act is not gelu, "
                                  f"open_clip's ViT-H-14's")

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], one prompt each -> (B,) scores."""
        return 100 * self.cosine(images, prompts)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a sail.py output folder")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", help="prompt file (default: the tiny world's 18 prompts; "
                                           "a real model needs it or --pickapic)")
    prompts.add_argument("--pickapic", nargs="+", metavar="SOURCE",
                         help="the captions of Pick-a-Pic v2 rows as prompts: parquet shards, or "
                              "a datasets folder (save_to_disk) or hub name")
    parser.add_argument("--pickapic-split", default="test_unique",
                        help="--pickapic with a datasets folder or hub name: the split (default "
                             "test_unique, the test split's unique captions)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--models", help="comma-separated stages to score (default: all)")
    parser.add_argument("--metrics", help="comma-separated, of: " + ", ".join(METRICS) +
                        " (default: annotator in the tiny world, pickscore otherwise)")
    parser.add_argument("--pickscore-model", default="yuvalkirstain/PickScore_v1")
    parser.add_argument("--pickscore-processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    parser.add_argument("--aesthetic-clip", default="openai/clip-vit-large-patch14")
    parser.add_argument("--aesthetic-head", help="the aesthetic predictor's .pth file")
    parser.add_argument("--imagereward-model", help="ImageReward.pt (default: from the hub)")
    parser.add_argument("--imagereward-config", help="its med_config.json (default: from the hub)")
    parser.add_argument("--imagereward-tokenizer", default="bert-base-uncased",
                        help="a bert-base-uncased tokenizer: folder or hub id")
    parser.add_argument("--hps-checkpoint", help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt "
                                                 "(default: HPSv2 from the hub)")
    parser.add_argument("--hps-clip", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                        help="the CLIP ViT-H-14 config and processor (folder or hub id)")
    parser.add_argument("--out", help="output folder; must not exist (default: <run>/eval-<time>)")
    options = parser.parse_args(argv)
    run = Path(options.run)
    try:
        config = json.loads((run / "config.json").read_text())
        args = sail.Args(**{k: v for k, v in config.items() if k in sail.Args.__dataclass_fields__})
        args.precision = args.precision or "fp32"  # runs of an older sail.py did not record it
        tiny_world.use_world(args.tiny_world)  # a variant world's run is scored by its own annotator
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise sail.InputError(f"{run}: not a sail.py run folder (config.json: {error})")
    # each stage's UNet (SD3, FLUX: transformer), or with LoRA its adapters
    saved = ["lora"] if args.lora_rank else ["unet", "transformer"]
    stages = sorted({p.parent.name for name in saved for p in run.glob(f"iter_*/{name}")},
                    key=lambda s: int(s[5:]))
    stages = ["base", *stages]
    if options.models:
        wanted = options.models.split(",")
        unknown = [m for m in wanted if m not in stages]
        if unknown:
            raise sail.InputError(f"--models: {', '.join(unknown)} not in {run} "
                                  f"(has {', '.join(stages)})")
        stages = wanted if "base" in wanted else ["base", *wanted]  # the win rates need it
    metrics = (options.metrics or ("annotator" if args.tiny else "pickscore")).split(",")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise sail.InputError(f"--metrics: unknown metric(s) {', '.join(unknown)} "
                              f"(known: {', '.join(METRICS)})")
    if "annotator" in metrics and not args.tiny:
        raise sail.InputError("--metrics annotator: the simulated annotator exists only in the "
                              "tiny world")
    if options.seeds < 1:
        raise sail.InputError("--seeds must be >= 1")
    if options.prompts:
        prompts = plumbing.read_prompts(options.prompts)
    elif options.pickapic:
        prompts = pickapic_captions(options.pickapic, options.pickapic_split)
    elif args.tiny:
        prompts = tiny_world.PROMPTS
    else:
        raise sail.InputError("a real model needs --prompts or --pickapic")
    out = Path(options.out or run / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise sail.InputError(f"--out {out}: already exists; choose a new folder")
    return options, args, config, stages, metrics, prompts, out


def pickapic_captions(sources, split):
    """The unique captions of Pick-a-Pic v2 rows, in order, read by pickapic.py's reader: parquet
    shards, or one `datasets` folder or hub name and its split."""
    import pickapic
    try:
        if all(str(source).endswith(".parquet") for source in sources):
            opened = pickapic.open_shards(sources)
        elif len(sources) == 1:
            opened = pickapic.open_dataset(sources[0], split)
        else:
            raise pickapic.InputError("--pickapic: parquet shards, or one datasets folder or name")
    except pickapic.InputError as error:
        raise sail.InputError(str(error))
    captions = dict.fromkeys(" ".join(str(row["caption"]).split())  # one line each, as prompts
                             for _, rows, _ in opened for row in rows(["caption"]))
    captions.pop("", None)
    if not captions:
        raise sail.InputError(f"--pickapic {' '.join(map(str, sources))}: no captions")
    return list(captions)


def use_adapters(pipe, run, stage):
    """A LoRA run's stage iter_i: the base with the adapters of rounds 0..i on, as the README
    loads it; the base: every adapter off."""
    rounds = [] if stage == "base" else [f"iter_{i}" for i in range(int(stage[5:]) + 1)]
    for name in rounds:
        if name not in getattr(plumbing.denoiser(pipe), "peft_config", {}):
            pipe.load_lora_weights(run / name / "lora", adapter_name=name)
    if rounds:
        pipe.enable_lora()
        pipe.set_adapters(rounds)
    elif getattr(plumbing.denoiser(pipe), "peft_config", None):
        pipe.disable_lora()


def score_stage(pipe, args, prompts, seeds, metrics, scorers):
    """Sample every prompt `seeds` times with fixed noise; every metric per image."""
    latents = sail.generate(pipe, prompts, seeds, args, torch.Generator().manual_seed(1234))
    images = sail.decode_latents(pipe.vae, latents)                 # (P*S, 3, H, W)
    per_image = [p for p in prompts for _ in range(seeds)]
    scores = {}
    if "annotator" in metrics:
        scores.update(tiny_world.sample_scores(images.cpu(), per_image))
    for name in METRICS[1:]:
        if name in metrics:
            scores[name] = scorers[name](images, per_image).cpu()
    return scores


def mean_and_interval(per_prompt, resamples=RESAMPLES, seed=0):
    """(P,) per-prompt values -> (mean, low, high): their mean and its 95% percentile bootstrap
    interval, the prompts drawn with replacement `resamples` times (a fixed seed: the same draws
    for every model and metric)."""
    per_prompt = per_prompt.double()
    picks = torch.randint(len(per_prompt), (resamples, len(per_prompt)),
                          generator=torch.Generator().manual_seed(seed))       # (resamples, P)
    low, high = per_prompt[picks].mean(1).quantile(torch.tensor([0.025, 0.975]).double())
    return per_prompt.mean().item(), low.item(), high.item()


def wins(scores, base):
    """(P, S) scores of a model and of the base, image for image (same prompt, same seed) ->
    (P,) the fraction of each prompt's images on which the model scores higher, ties half."""
    return ((scores > base).double() + 0.5 * (scores == base).double()).mean(1)


def table_row(stage, scores, base, n_prompts, seeds):
    """A stage's per-image scores -> its row: per metric the mean and win rate against the base,
    each with its interval. Images are prompt-major, so (P, S) is a view; a metric over a subset
    of the prompts (annotator/seen) keeps whole prompts, and the same ones for every stage."""
    row = {"model": stage, "prompts": n_prompts, "images": n_prompts * seeds}
    for name, values in scores.items():
        grid, base_grid = values.view(-1, seeds), base[name].view(-1, seeds)       # (P, S)
        row[name], row[name + " low"], row[name + " high"] = mean_and_interval(grid.mean(1))
        (row[name + " win"], row[name + " win low"],
         row[name + " win high"]) = mean_and_interval(wins(grid, base_grid))
    return row


def write_tables(rows, out, caption):
    out.mkdir(parents=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = [k for k in rows[0] if k not in ("model", "prompts", "images")
             and not k.endswith((" low", " high", " win"))]
    lines = [caption, "", "| model | " + " | ".join(f"{n} | {n} win vs base" for n in names) +
             " | prompts |", "|---|" + "---|---|" * len(names) + "---|"]
    for row in rows:
        cells = [f"{row[n]:.3f} [{row[n + ' low']:.3f}, {row[n + ' high']:.3f}] | "
                 + (f"{row[n + ' win']:.2f} [{row[n + ' win low']:.2f}, {row[n + ' win high']:.2f}]"
                    if row["model"] != "base" else "0.5 (itself)") for n in names]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['prompts']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    try:
        options, args, config, stages, metrics, prompts, out = parse(
            sys.argv[1:] if argv is None else argv)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipe = sail.load_pipeline(config["model_path"], device)
        scorers = {}
        if "pickscore" in metrics:
            scorers["pickscore"] = PickScore(options.pickscore_model,
                                             options.pickscore_processor, device)
        if "aesthetic" in metrics:
            scorers["aesthetic"] = Aesthetic(options.aesthetic_clip, options.aesthetic_head, device)
        if "imagereward" in metrics:
            scorers["imagereward"] = ImageReward(options.imagereward_model,
                                                 options.imagereward_config,
                                                 options.imagereward_tokenizer, device)
        if "hps" in metrics:
            scorers["hps"] = HPS(options.hps_checkpoint, options.hps_clip, device)
    except sail.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sail.set_sampler(pipe, args)
    base = plumbing.denoiser(pipe)  # the UNet, or SD3's / FLUX's transformer
    scores = {}
    for stage in sorted(stages, key=lambda s: s != "base"):  # the base first: the others need it
        if args.lora_rank:
            use_adapters(pipe, Path(options.run), stage)
        else:
            setattr(pipe, plumbing.denoiser_folder(base), base if stage == "base" else
                    plumbing.saved_model(options.run, stage, base).to(device))
        scores[stage] = score_stage(pipe, args, prompts, options.seeds, metrics, scorers)
        print(f"{stage} | " + " | ".join(f"{name} {values.mean().item():.4g}"
                                          for name, values in scores[stage].items()), flush=True)
    rows = [table_row(stage, scores[stage], scores["base"], len(prompts), options.seeds) for stage in stages]
    write_tables(rows, out, f"{options.run}: {len(prompts)} prompts x {options.seeds} seeds, "
                 f"{args.sampler} {args.sample_steps} steps, CFG {args.guidance_scale:g}. Mean "
                 f"over images and win rate against the base (same prompt and seed, ties half), "
                 f"each with its 95% bootstrap interval over prompts ({RESAMPLES} resamples).")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
