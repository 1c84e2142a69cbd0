"""Score a SAIL run's models like the paper's tables: fixed prompts, fixed seeds, its sampler.

    python evaluate.py runs/tiny-20261125-221503                 # tiny world: hidden annotator
    python evaluate.py runs/sd-... --prompts test.txt --metrics pickscore
    python evaluate.py runs/sd-... --models base,iter_3 --seeds 2

Every model of the run is scored (base, step 0 = iter_0, each iteration's saved UNet), or those
named by --models. Images are drawn with the run's own sampler settings (config.json), the same
noise for every model. One row per model, mean and std over images, in <out>/results.md and .csv
(default <run>/eval-<time>).

Metrics (--metrics, comma-separated):
    annotator   tiny world only: the hidden simulated human (0-100), also on seen and unseen
                prompts, and fidelity (the image still shows its prompt)
    pickscore   PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(text, image) of the
                PickScore_v1 CLIP model with the CLIP-ViT-H-14 processor. --pickscore-model and
                --pickscore-processor take hub ids (the defaults) or local folders.
    aesthetic   the LAION aesthetic predictor (improved-aesthetic-predictor, sac+logos+ava1-l14-
                linearMSE.pth): a linear MLP on the L2-normalised CLIP ViT-L/14 image embedding.
                --aesthetic-head is that .pth file (not on the hub: download it from
                github.com/christophschuhmann/improved-aesthetic-predictor); --aesthetic-clip
                the CLIP model (default openai/clip-vit-large-patch14).
ImageReward and HPSv2 of the paper's tables are not implemented: their packages load weights
from the network, which we could not reach, so nothing here could test them.
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
from diffusers import UNet2DConditionModel  # noqa: E402

import plumbing  # noqa: E402
import sail  # noqa: E402
import tiny_world  # noqa: E402

METRICS = ("annotator", "pickscore", "aesthetic")


class ClipScorer:
    """A CLIP model and its processor, from hub ids or folders: what PickScore and the aesthetic
    score both start from."""

    def __init__(self, model, processor, device, name):
        from transformers import AutoModel, AutoProcessor
        try:
            self.processor = AutoProcessor.from_pretrained(processor)
            self.model = AutoModel.from_pretrained(model).eval().to(device)
        except Exception as error:
            raise sail.InputError(f"cannot load the {name} model {model} / processor "
                                  f"{processor}: {str(error).strip().splitlines()[0]}")
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


class PickScore(ClipScorer):
    """PickScore: s(y, x) = logit_scale.exp() * cos(text_embedding(y), image_embedding(x))."""

    def __init__(self, model, processor, device):
        super().__init__(model, processor, device, "PickScore")

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1], one prompt each -> (B,) scores."""
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77,
                              return_tensors="pt").to(self.device)
        image_emb = self.image_embedding(images)                                 # (B, D)
        text_emb = self.unit(self.features(self.model.get_text_features(**text)))  # (B, D)
        return self.model.logit_scale.exp() * (image_emb * text_emb).sum(-1)


class Aesthetic(ClipScorer):
    """LAION aesthetic score: MLP(image_embedding / |image_embedding|), a CLIP ViT-L/14 embedding.

    The MLP is improved-aesthetic-predictor's: Linear(768, 1024), Dropout, Linear(1024, 128),
    Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), no activations (its
    "linearMSE" heads); its .pth holds the weights under those nn.Sequential indices.
    """

    def __init__(self, clip, head, device):
        if head is None:
            raise sail.InputError("--metrics aesthetic needs --aesthetic-head, the predictor's "
                                  ".pth (github.com/christophschuhmann/improved-aesthetic-predictor)")
        super().__init__(clip, clip, device, "aesthetic predictor's CLIP")
        size = self.model.config.projection_dim
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
        try:
            weights = torch.load(head, map_location="cpu", weights_only=True)
            self.mlp.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()})
        except Exception as error:
            raise sail.InputError(f"cannot load the aesthetic predictor's head {head}: "
                                  f"{str(error).strip().splitlines()[0]}")
        self.mlp.eval().to(device)

    @torch.no_grad()
    def __call__(self, images, prompts):
        """images (B, 3, H, W) in [0, 1] -> (B,) scores (the prompts are not used)."""
        return self.mlp(self.image_embedding(images)).squeeze(-1)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a sail.py output folder")
    parser.add_argument("--prompts", help="prompt file (default: the tiny world's 18 prompts; "
                                          "required for a real model)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--models", help="comma-separated stages to score (default: all)")
    parser.add_argument("--metrics", help="comma-separated, of: " + ", ".join(METRICS) +
                        " (default: annotator in the tiny world, pickscore otherwise)")
    parser.add_argument("--pickscore-model", default="yuvalkirstain/PickScore_v1")
    parser.add_argument("--pickscore-processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    parser.add_argument("--aesthetic-clip", default="openai/clip-vit-large-patch14")
    parser.add_argument("--aesthetic-head", help="the aesthetic predictor's .pth file")
    parser.add_argument("--out", help="output folder; must not exist (default: <run>/eval-<time>)")
    options = parser.parse_args(argv)
    run = Path(options.run)
    try:
        config = json.loads((run / "config.json").read_text())
        args = sail.Args(**{k: v for k, v in config.items() if k in sail.Args.__dataclass_fields__})
        args.precision = args.precision or "fp32"  # runs of an older sail.py did not record it
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise sail.InputError(f"{run}: not a sail.py run folder (config.json: {error})")
    saved = "lora" if args.lora_rank else "unet"  # a LoRA run saves each stage's adapters
    stages = sorted((p.parent.name for p in run.glob(f"iter_*/{saved}")), key=lambda s: int(s[5:]))
    stages = ["base", *stages]
    if options.models:
        wanted = options.models.split(",")
        unknown = [m for m in wanted if m not in stages]
        if unknown:
            raise sail.InputError(f"--models: {', '.join(unknown)} not in {run} "
                                  f"(has {', '.join(stages)})")
        stages = wanted
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
    elif args.tiny:
        prompts = tiny_world.PROMPTS
    else:
        raise sail.InputError("--prompts is required for a real model")
    out = Path(options.out or run / f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise sail.InputError(f"--out {out}: already exists; choose a new folder")
    return options, args, config, stages, metrics, prompts, out


def use_adapters(pipe, run, stage):
    """A LoRA run's stage iter_i: the base with the adapters of rounds 0..i on, as the README
    loads it; the base: every adapter off."""
    rounds = [] if stage == "base" else [f"iter_{i}" for i in range(int(stage[5:]) + 1)]
    for name in rounds:
        if name not in getattr(pipe.unet, "peft_config", {}):
            pipe.load_lora_weights(run / name / "lora", adapter_name=name)
    if rounds:
        pipe.enable_lora()
        pipe.set_adapters(rounds)
    elif getattr(pipe.unet, "peft_config", None):
        pipe.disable_lora()


def score_stage(pipe, args, prompts, seeds, metrics, scorers):
    """Sample every prompt `seeds` times with fixed noise; every metric per image."""
    latents = sail.generate(pipe, prompts, seeds, args, torch.Generator().manual_seed(1234))
    images = sail.decode_latents(pipe.vae, latents)                 # (P*S, 3, H, W)
    per_image = [p for p in prompts for _ in range(seeds)]
    scores = {}
    if "annotator" in metrics:
        scores.update(tiny_world.sample_scores(images.cpu(), per_image))
    for name in ("pickscore", "aesthetic"):
        if name in metrics:
            scores[name] = scorers[name](images, per_image).cpu()
    return scores


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
    except sail.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sail.set_sampler(pipe, args)
    base_unet = pipe.unet
    rows = []
    for stage in stages:
        if args.lora_rank:
            use_adapters(pipe, Path(options.run), stage)
        else:
            pipe.unet = base_unet if stage == "base" else UNet2DConditionModel.from_pretrained(
                Path(options.run) / stage / "unet").to(device)
        scores = score_stage(pipe, args, prompts, options.seeds, metrics, scorers)
        row = {"model": stage, "prompts": len(prompts), "images": len(prompts) * options.seeds}
        for name, values in scores.items():
            row[name] = values.mean().item()
            row[name + " std"] = values.std().item() if len(values) > 1 else 0.0
        rows.append(row)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()), flush=True)
    out.mkdir(parents=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    names = [k for k in rows[0] if k not in ("model", "prompts", "images") and not k.endswith(" std")]
    lines = [f"{options.run}: {len(prompts)} prompts x {options.seeds} seeds, {args.sampler} "
             f"{args.sample_steps} steps, CFG {args.guidance_scale:g}; mean ± std over images.", "",
             "| model | " + " | ".join(names) + " | prompts |", "|---|" + "---|" * (len(names) + 1)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(
            f"{row[n]:.3f} ± {row[n + ' std']:.3f}" for n in names) + f" | {row['prompts']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
