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

Every figure is the median of several repeats after a warm-up. Peak memory is the process's peak
resident set (VmHWM, reset before each measurement) on CPU, torch.cuda.max_memory_allocated on a
GPU. Writes <out> (default runs/bench-<time>): results.md, results.csv and scaling.png (needs
matplotlib).
"""

import argparse
import copy
import csv
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import sail  # noqa: E402


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
        self.cond = sail.encode_text(pipe, ["a red circle"], args.resolution)  # (1, L, D)

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


def sd15_shaped_pipeline(folder):
    """Stable Diffusion 1.5's architecture (UNet 860M, CLIP ViT-L/14 text encoder, VAE) with random
    weights, from configs: timings and memory at real scale need no downloaded weights."""
    tokenizer = sail.tiny_tokenizer(folder)  # a few ids of the vocabulary: cost does not depend on them
    tokenizer.model_max_length = 77
    text_encoder = sail.CLIPTextModel(sail.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = sail.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.x blocks
    vae = sail.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
        sample_size=512, scaling_factor=0.18215)
    scheduler = sail.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                   steps_offset=1)
    return sail.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


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


# The memory options of sail.py, each measured alone: (precision, gradient checkpointing, optimizer)
MEMORY_OPTIONS = [("fp32", False, "adamw"), ("fp32", True, "adamw"), ("bf16", False, "adamw"),
                  ("bf16", True, "adamw"), ("bf16", True, "adafactor")]


def memory(device, pairs, resolution, out):
    """Peak memory of one Diffusion-DPO step of SD 1.5-shaped models, per memory option.

    The whole training stage as sail.py holds it: theta (fp32) with its gradients and optimizer
    state, the frozen reference UNet, VAE and text encoder in --precision, activations of a
    micro-batch of `pairs` pairs. Fresh models for every option.
    """
    seed_pairs = sail.read_seed_pairs(Path(__file__).parent / "seed_pairs.json")
    rows = []
    for precision, checkpointing, optimizer in MEMORY_OPTIONS:
        with tempfile.TemporaryDirectory() as scratch:
            pipe = sail.prepare_pipeline(sd15_shaped_pipeline(Path(scratch)), device)
            args = sail.Args(resolution=resolution, precision=precision, optimizer=optimizer,
                             gradient_checkpointing=checkpointing, effective_batch=pairs,
                             micro_batch=pairs, dpo_steps=1, lr=1e-6, checkpoint_every=2)
            sail.cast_frozen_models(pipe, precision)
            if checkpointing:
                pipe.unet.enable_gradient_checkpointing()
            ref = sail.frozen_copy(pipe.unet, precision)
            run = sail.Run(scratch, args)
            run.open_log()
            reset_peak_memory(device)
            started = time.perf_counter()
            sail.diffusion_dpo(pipe, ref, seed_pairs, args, "iter_0", run)
            seconds = time.perf_counter() - started
            row = {"precision": precision, "gradient_checkpointing": checkpointing,
                   "optimizer": optimizer, "pairs": pairs, "seconds": seconds,
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
             "| precision | gradient checkpointing | optimizer | peak GiB | seconds |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
              f"{r['optimizer']} | {r['peak_gib']:.1f} | {r['seconds']:.1f} |" for r in rows]
    out.mkdir(parents=True)
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    with open(out / "memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print((out / "memory.md").read_text())


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
    parser.add_argument("--pretrain-steps", type=int, default=sail.Args.pretrain_steps,
                        help="tiny base pretraining steps (cached)")
    parser.add_argument("--sd15-shaped", action="store_true",
                        help="Stable Diffusion 1.5's architecture with random weights (for a GPU)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="--sd15-shaped only: image size in pixels (SD 1.5: 512)")
    parser.add_argument("--memory", action="store_true",
                        help="instead: peak memory of one SD 1.5-shaped DPO step per memory "
                             "option (precision, gradient checkpointing, optimizer)")
    parser.add_argument("--pairs", type=int, default=1, help="--memory only: pairs per micro-batch")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(options.out)
    if out.exists():
        print(f"error: --out {out}: already exists; choose a new folder", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.memory:
        memory(device, options.pairs, options.resolution, out)
        return 0
    if options.sd15_shaped:  # SD 1.5's own settings: N = 8, K = 10, DDPM 50 steps, 128 pairs
        args = sail.Args(resolution=options.resolution, precision=sail.default_precision())
        args.lr = 1e-8 * args.effective_batch
        with tempfile.TemporaryDirectory() as scratch:
            pipe = sail.prepare_pipeline(sd15_shaped_pipeline(Path(scratch)), device)
        latent = options.resolution // 8
        latent_sizes = (latent, latent // 2)  # the native size first: --quick measures only it
    else:
        args = sail.Args(tiny=True, precision="fp32", **sail.TINY_PRESET)
        pipe = sail.load_pipeline(sail.tiny_base_model(options.pretrain_steps), device)
        latent_sizes = (8, 16, 32)
    sail.set_sampler(pipe, args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the DPO stage's metrics.jsonl
        bench = Bench(pipe, args, sail.read_seed_pairs(Path(__file__).parent / "seed_pairs.json"),
                      Path(scratch))
        run(bench, options.quick, rows, latent_sizes)
    out.mkdir(parents=True)
    write(out, rows, device, args)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
