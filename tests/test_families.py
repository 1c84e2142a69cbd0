"""Model families beyond SD 1.5: SDXL, SD3 and FLUX on tiny pipelines built from configs."""

import copy
import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                          T5EncoderModel, T5Tokenizer)
from safetensors import safe_open

import plumbing
import sail
import tiny_world
from conftest import (AT_16PX, HERE, REAL_QUICK, TINY_DATA, Crash, build_tiny_sdxl, count_calls,
                      latents, needs_peft, perturbed, records, run_saved_model, torchrun)


def test_presets_follow_the_official_warmup_per_family(tiny_base, tmp_path):
    build_tiny_sdxl(tmp_path / "sdxl", tiny_base)
    assert sail.parse_args(["--model", tiny_base]).warmup_steps == 500          # SD 1.5
    assert sail.parse_args(["--model", str(tmp_path / "sdxl")]).warmup_steps == 200  # SDXL


# -------------------------------------------------------------------------------------------------
# Flow-matching models (SD3, FLUX): Eq. RF, their conditioning, whole runs on tiny pipelines
# -------------------------------------------------------------------------------------------------

def t5_parts(words):
    """A word-level T5 tokenizer (built offline, like tiny_world.tokenizer) and a tiny T5 encoder."""
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0),
                                   *((f"\u2581{word}", -1.0) for word in words)], extra_ids=0)
    return tokenizer, T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64,
                                              d_kv=8, num_layers=2, num_heads=4))


def tiny_clip(words, kind, **extra):
    return kind(CLIPTextConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=words.bos_token_id,
        eos_token_id=words.eos_token_id, pad_token_id=words.pad_token_id, **extra))


def tiny_vae(shift_factor, scaling_factor):
    """16 px -> (4, 8, 8) latents, with the shifted latents of SD3's and FLUX's VAEs."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         norm_num_groups=4, block_out_channels=(8, 16), sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)


def build_tiny_flow(folder, family):
    """An SD3- or FLUX-shaped pipeline from configs (as diffusers' own tests build them): "sd3"
    (two CLIPs and T5), "sd3-no-t5" (T5 left out, as users do to save memory) or "flux"."""
    torch.manual_seed(0)
    words = tiny_world.tokenizer(Path(folder).parent)
    vocabulary = ["a", *tiny_world.COLOURS, *tiny_world.SHAPES]
    if family == "flux":  # packed 2x2 patches: in_channels = 4 latent channels x 4
        t5_tokenizer, t5 = t5_parts(vocabulary)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1's: the shift grows with image size
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(0.1159, 0.3611),
                     text_encoder=tiny_clip(words, CLIPTextModel), tokenizer=words,
                     text_encoder_2=t5, tokenizer_2=t5_tokenizer).save_pretrained(folder)
        return
    t5_tokenizer, t5 = t5_parts(vocabulary) if family == "sd3" else (None, None)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(0.0609, 1.5305), tokenizer=words, tokenizer_2=words,
        text_encoder=tiny_clip(words, CLIPTextModelWithProjection, projection_dim=16),
        text_encoder_2=tiny_clip(words, CLIPTextModelWithProjection, projection_dim=16),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer).save_pretrained(folder)


FLOW_PIPELINES = {"sd3": StableDiffusion3Pipeline, "sd3-no-t5": StableDiffusion3Pipeline,
                  "flux": FluxPipeline}


@pytest.fixture(scope="session", params=list(FLOW_PIPELINES))
def flow_model(request, tmp_path_factory):
    """(family, folder) of a saved tiny flow pipeline."""
    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    build_tiny_flow(folder, request.param)
    return request.param, folder


def load_flow(flow_model, **parts):
    """The saved pipeline, loaded as a user would (SD3 without T5: say so, README)."""
    family, folder = flow_model
    if family == "sd3-no-t5":
        parts = {"text_encoder_3": None, "tokenizer_3": None, **parts}
    pipe = FLOW_PIPELINES[family].from_pretrained(folder, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flow_prediction_and_conditioning_are_what_the_pipeline_samples_with(flow_model):
    """One Euler step of the pipeline from sigma = 1 is x - v(x, 1000): sail's predict and
    encode_text (FLUX: 2x2 patches, position ids, t / 1000, guidance) must give that v."""
    family, _ = flow_model
    pipe = load_flow(flow_model)
    x = latents(1, seed=5)                                                        # (1, 4, 8, 8)
    settings = SimpleNamespace(resolution=16, guidance_scale=3.5)
    packed = FluxPipeline._pack_latents(x, 1, 4, 8, 8) if family == "flux" else x
    with torch.no_grad():
        stepped = pipe("a red circle", num_inference_steps=1, height=16, width=16,
                       guidance_scale=settings.guidance_scale if family == "flux" else 1.0,
                       latents=packed, output_type="latent").images
        if family == "flux":
            stepped = FluxPipeline._unpack_latents(stepped, 16, 16, pipe.vae_scale_factor)
        v = sail.predict(pipe.transformer, x, torch.tensor([1000.0]),
                         sail.encode_text(pipe, ["a red circle"], settings))
    torch.testing.assert_close(stepped, x - v, atol=1e-5, rtol=1e-4)


def test_flow_latents_decode_as_the_pipeline_decodes_them(flow_model):
    """generate's latents (FLUX: unpacked from its tokens) through decode_latents (shift and scale
    undone) are the images the pipeline itself returns from the same noise."""
    pipe = load_flow(flow_model)
    settings = SimpleNamespace(resolution=16, guidance_scale=3.5, sample_steps=2, precision="fp32")
    with torch.no_grad():
        latents = sail.generate(pipe, ["a red circle"], 1, settings, torch.Generator().manual_seed(3))
        images = pipe("a red circle", num_inference_steps=2, height=16, width=16, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert latents.shape == (1, 4, 8, 8)
    torch.testing.assert_close(sail.decode_latents(pipe.vae, latents), images, atol=1e-4, rtol=1e-4)


def test_flow_seed_images_encode_as_sd3_and_flux_training_scripts_do(flow_model):
    """diffusers' train_dreambooth_sd3.py / _flux.py: latents = (sample - shift_factor) * scaling_factor."""
    vae = load_flow(flow_model).vae
    images, noise = torch.rand(2, 3, 16, 16) * 2 - 1, latents(2, seed=4)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        expected = (posterior.mean + posterior.std * noise - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(
            sail.posterior_sample(vae, *plumbing.vae_posterior(vae, images), noise), expected)


def test_flow_conditioning_per_family(flow_model):
    family, _ = flow_model
    pipe = load_flow(flow_model)
    with torch.no_grad():
        cond = sail.encode_text(pipe, ["a red circle", ""], AT_16PX)
    shapes = {name: tuple(value.shape) for name, value in cond.items()}
    if family == "flux":  # T5 states (512 tokens), CLIP's pooled output, the guidance scale
        assert shapes == {"encoder_hidden_states": (2, 512, 32), "pooled_projections": (2, 16),
                          "guidance": (2,)}
        assert cond["guidance"].tolist() == [3.5, 3.5]
    else:  # 8 CLIP tokens + 256 T5 tokens; both CLIPs pooled
        assert shapes == {"encoder_hidden_states": (2, 8 + 256, 32), "pooled_projections": (2, 32)}
        t5_part = cond["encoder_hidden_states"][:, 8:]
        assert (t5_part.abs().sum() == 0) == (family == "sd3-no-t5")  # without T5: zeros


def test_flow_dpo_loss_is_ln2_at_theta_equals_ref_and_eq8_matches_a_plain_loop(flow_model):
    pipe = load_flow(flow_model)
    scheduler = sail.training_schedule(pipe)
    theta, ref = perturbed(pipe.transformer), pipe.transformer
    x = latents(3, seed=4)
    with torch.no_grad():
        cond = sail.encode_text(pipe, ["a red circle"], AT_16PX)
        noise, t = latents(6, seed=1), torch.tensor([10, 200, 400, 600, 800, 990])
        err = sail.denoising_error(ref, scheduler, latents(6), noise, t, map_rows(cond, 6))
        loss, _ = sail.dpo_loss(err[:3], err[3:], err[:3], err[3:], 5000.0)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        r = sail.implicit_reward(theta, ref, x, cond, scheduler, 5000.0, 4,
                                 torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(7)  # the same K draws, one at a time
        t = sail.draw_timesteps(scheduler, 4, generator)
        eps = torch.randn((4, 4, 8, 8), generator=generator)
        expected = []
        for n in range(3):
            differences = []
            for k in range(4):
                sigma = scheduler.sigmas[t[k]]
                x_t = (1 - sigma) * x[n:n + 1] + sigma * eps[k:k + 1]     # Eq. RF
                errors = [((sail.predict(m, x_t, scheduler.timesteps[t[k:k + 1]], cond)
                            - (eps[k:k + 1] - x[n:n + 1])) ** 2).mean() for m in (theta, ref)]
                differences.append(errors[0] - errors[1])
            expected.append(-(5000.0 / 2) * torch.stack(differences).mean())  # Eq. 8
    torch.testing.assert_close(r, torch.stack(expected), rtol=1e-4, atol=1e-4)


def map_rows(cond, n):
    return sail.map_cond(lambda v: v.repeat_interleave(n, dim=0), cond)


@pytest.mark.parametrize("family", ["sd3", "flux"])  # SD3 without T5 differs in its text only
def test_flow_model_trained_towards_an_image_ranks_it_first(family, tmp_path):
    build_tiny_flow(tmp_path / "pipeline", family)
    pipe = load_flow((family, tmp_path / "pipeline"))
    scheduler = sail.training_schedule(pipe)
    x, target = latents(6, seed=3), 4
    theta = copy.deepcopy(pipe.transformer).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(theta.parameters(), lr=1e-3)
    with torch.no_grad():
        cond = sail.encode_text(pipe, ["a red circle"], AT_16PX)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):  # the model's own training loss, on candidate 4 only
        t = sail.draw_timesteps(scheduler, 8, generator)
        noise = torch.randn((8, 4, 8, 8), generator=generator)
        loss = sail.denoising_error(theta, scheduler, x[target:target + 1].expand(8, -1, -1, -1),
                                    noise, t, map_rows(cond, 8)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        r = sail.implicit_reward(theta.eval(), pipe.transformer, x, cond, scheduler, 5000.0, 10,
                                 torch.Generator().manual_seed(11))
    assert sail.best_worst_pair(r)[0] == target


def test_flow_presets_and_a_sampler_that_does_not_fit_is_refused(flow_model, tiny_base, capsys):
    family, folder = flow_model
    args = sail.parse_args(["--model", str(folder)])
    assert (args.sampler, args.sample_steps, args.resolution, args.optimizer) == ("euler", 28, 1024,
                                                                                 "adafactor")
    assert (args.guidance_scale, args.cfg_dropout) == ((3.5, 0.0) if family == "flux" else (7.0, 0.2))
    assert sail.main(["--model", str(folder), "--sampler", "ddim", *TINY_DATA]) == 2
    assert "use --sampler euler" in capsys.readouterr().err
    assert sail.main(["--model", tiny_base, "--sampler", "euler", *TINY_DATA]) == 2
    assert "euler is for flow-matching models" in capsys.readouterr().err


def test_flow_model_runs_end_to_end_and_its_transformer_loads_back(flow_model, tmp_path, capsys,
                                                                   tiny_pickscore):
    import evaluate
    family, folder = flow_model
    config = run_saved_model(folder, tmp_path / "run", capsys)
    assert config["sampler"] == "euler"  # the preset's: the flow-matching Euler
    kind = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    trained = kind.from_pretrained(tmp_path / "run" / "iter_1" / "transformer")
    base = load_flow(flow_model).transformer.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in trained.state_dict().items())
    pipe = load_flow(flow_model, transformer=trained)
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)
    assert evaluate.main([str(tmp_path / "run"), "--seeds", "1", "--metrics", "pickscore",
                          "--prompts", str(HERE / "prompts.txt"), "--models", "base,iter_1",
                          "--pickscore-model", str(tiny_pickscore / "model"),
                          "--pickscore-processor", str(tiny_pickscore / "processor"),
                          "--out", str(tmp_path / "eval")]) == 0  # stages load as transformers
    with open(tmp_path / "eval" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["base", "iter_1"] and rows[0]["pickscore"] != rows[1]["pickscore"]


@needs_peft
def test_flow_lora_run_saves_adapters_its_pipeline_loads(flow_model, tmp_path, capsys):
    family, folder = flow_model
    run = tmp_path / "run"
    run_saved_model(folder, run, capsys, "--lora-rank", "4", "--reward-ref", "prev",
                    "--precision", "bf16", lr=plumbing.LORA_LR["real"])  # FLUX users' memory savers
    assert not (run / "iter_1" / "transformer").exists()  # merged only with --save-merged
    # adapters where the family's own diffusers LoRA script puts them: SD3 on its text stream's
    # projections too, FLUX also on both streams' feed-forwards
    with safe_open(run / "iter_0" / "lora" / "pytorch_lora_weights.safetensors", "pt") as saved:
        adapted = {key.split(".lora_")[0] for key in saved.keys()}
    pipe = load_flow(flow_model)
    expected = plumbing.LORA_MODULES["SD3Transformer2DModel" if "sd3" in family
                                     else "FluxTransformer2DModel"]
    assert adapted == {f"transformer.{name}" for name, _ in pipe.transformer.named_modules()
                       if any(name.endswith("." + module) for module in expected)}
    assert any(name.endswith(".add_q_proj") for name in adapted)  # more than the attention's
    assert family != "flux" or any(name.endswith(".ff_context.net.2") for name in adapted)
    for stage in ("iter_0", "iter_1"):
        pipe.load_lora_weights(run / stage / "lora", adapter_name=stage)
    pipe.set_adapters(["iter_0", "iter_1"])
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_gradient_checkpointing_changes_memory_not_results(family, tmp_path, capsys,
                                                               monkeypatch):
    """The transformer recomputes its blocks' activations in the backward pass (torch's
    checkpoint is called) and every loss is the same."""
    folder = tmp_path / family
    build_tiny_flow(folder, family)
    losses, calls, checkpoint = [], [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    for checkpointing in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"run{len(losses)}"
        assert sail.main(["--model", str(folder), *REAL_QUICK, *TINY_DATA, "--iters", "0",
                          "--lr", "1e-3", *checkpointing, "--out", str(out)]) == 0
        losses.append([r["loss"] for r in records(out) if "step" in r])
        assert bool(calls) == bool(checkpointing)
    assert len(losses[0]) == 3 and losses[0][1] != losses[0][0]  # it trained...
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)        # ...the same with checkpointing


def test_a_killed_flux_run_resumed_by_torchrun_computes_what_one_process_does(tmp_path, monkeypatch,
                                                                             capsys):
    """FLUX killed at iter_1's third DPO step, finished by 2 processes from its checkpoint and
    iter_0's saved transformer: the result is one process's (fp32: at FLUX's beta, 300, bf16 rounding
    alone moves the loss far more than these few tiny steps do)."""
    folder = tmp_path / "flux"
    build_tiny_flow(folder, "flux")
    flags = ["--model", str(folder), *REAL_QUICK, *TINY_DATA, "--checkpoint-every", "1",
             "--lr", "1e-4", "--reward-ref", "prev", "--iters", "2"]
    expected, out = tmp_path / "expected", tmp_path / "run"
    assert sail.main([*flags, "--out", str(expected)]) == 0
    count_calls(monkeypatch, "dpo_loss", crash_at=11)  # 2 micro-batches a step, 3 steps a stage
    with pytest.raises(Crash):
        sail.main([*flags, "--out", str(out)])
    assert (out / "iter_0" / "transformer").exists() and not (out / "iter_1" / "summary.json").exists()
    torchrun("--resume", str(out))
    ours, theirs = records(out), records(expected)
    assert [(r["stage"], r.get("step")) for r in ours] == [(r["stage"], r.get("step")) for r in theirs]
    assert [r["loss"] for r in ours if "loss" in r] == pytest.approx(
        [r["loss"] for r in theirs if "loss" in r], rel=1e-2)
    one, two = (FluxTransformer2DModel.from_pretrained(run / "iter_2" / "transformer").state_dict()
                for run in (expected, out))
    base = FluxTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    trained = max((one[k] - base[k]).abs().max() for k in one)
    assert max((one[k] - two[k]).abs().max() for k in one) < 0.1 * trained


# -------------------------------------------------------------------------------------------------
# --pair-noise prior (PNAPO): a self-labelled pair's images keep the noise they were sampled from
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_starting_noise_is_the_noise_the_pipeline_sampled_from(family, tmp_path):
    """Drawn again from generators seeded as the candidates' were, it is what the pipeline drew:
    given back as its starting latents (FLUX: packed), the pipeline draws the same images."""
    folder = tmp_path / family
    build_tiny_flow(folder, family)
    pipe = load_flow((family, folder))
    settings = SimpleNamespace(resolution=16, guidance_scale=3.5, sample_steps=2, precision="fp32")
    keys = [(0, "iter_1", "candidate", j, c) for j in range(2) for c in range(2)]
    with torch.no_grad():
        drawn = sail.generate(pipe, ["a red circle", "a blue square"], 2, settings,
                              [sail.seeded(*key) for key in keys])                # (4, 4, 8, 8)
        noise = plumbing.starting_noise(pipe, drawn.shape, [sail.seeded(*key) for key in keys])
        given = FluxPipeline._pack_latents(noise, 4, 4, 8, 8) if family == "flux" else noise
        again = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, latents=given,
                     num_inference_steps=2, height=16, width=16, guidance_scale=3.5,
                     output_type="latent").images
    if family == "flux":
        again = FluxPipeline._unpack_latents(again, 16, 16, pipe.vae_scale_factor)
    assert torch.equal(again, drawn) and not torch.equal(noise[0], noise[1])


def dpo_step_noises(monkeypatch):
    """Spies: per DPO step, (stage, its batch, the eps theta and ref were given)."""
    events, real_data, real_error = [], sail.dpo_step_data, sail.denoising_error

    def dpo_step_data(pairs, step, args, stage, *rest):
        data = real_data(pairs, step, args, stage, *rest)
        events.append([stage, data[0]])
        return data

    def denoising_error(unet, scheduler, x0, noise, t, cond):
        if events and len(events[-1]) < 4:  # a step's two calls: theta, then ref (Eq. 8's follow)
            events[-1].append(noise.clone())
        return real_error(unet, scheduler, x0, noise, t, cond)
    monkeypatch.setattr(sail, "dpo_step_data", dpo_step_data)
    monkeypatch.setattr(sail, "denoising_error", denoising_error)
    return events


def test_pair_noise_prior_trains_each_self_labelled_image_on_its_starting_noise(tmp_path, capsys,
                                                                               monkeypatch):
    """A flow run with --pair-noise prior saves each pair's starting noises beside its latents
    (the noise its candidate was sampled from); every DPO step noises a self-labelled pair's
    winner and loser with their own (Eq. RF), a seed pair's both with the step's fresh noise;
    without the flag, no noise is saved and every pair's winner and loser share it."""
    folder = tmp_path / "sd3"
    build_tiny_flow(folder, "sd3")
    whole = ["--micro-batch", "4"]  # one micro-batch a step: one theta call, one ref call
    events = dpo_step_noises(monkeypatch)
    run_saved_model(folder, tmp_path / "run", capsys, "--pair-noise", "prior", *whole)
    pairs = json.loads((tmp_path / "run" / "iter_1" / "pairs.json").read_text())
    assert pairs and all(p["chosen_noise"].endswith("_chosen_noise.pt") for p in pairs)
    # each image's noise is the one it was sampled from: iter_0's model, started from it, draws it
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    pipe = load_flow(("sd3", folder), transformer=SD3Transformer2DModel.from_pretrained(
        tmp_path / "run" / "iter_0" / "transformer"))
    for pair in pairs:
        load = lambda key: torch.load(tmp_path / "run" / "iter_1" / pair[key], weights_only=True)
        with torch.no_grad():
            drawn = pipe(pair["prompt"], latents=torch.stack([load("chosen_noise"),
                                                              load("rejected_noise")]),
                         num_images_per_prompt=2, num_inference_steps=config["sample_steps"],
                         guidance_scale=config["guidance_scale"], height=16, width=16,
                         output_type="latent").images
        torch.testing.assert_close(drawn, torch.stack([load("chosen_latents"),
                                                       load("rejected_latents")]))
    checked = 0
    for stage, batch, theta, ref in events:
        assert torch.equal(theta, ref)  # theta and ref are given the same eps
        for i, pair in enumerate(batch):
            winner, loser = theta[i], theta[len(batch) + i]
            if "chosen_noise" in pair:
                checked += 1
                assert torch.equal(winner, torch.load(pair["chosen_noise"], weights_only=True))
                assert torch.equal(loser, torch.load(pair["rejected_noise"], weights_only=True))
            else:
                assert torch.equal(winner, loser)  # Diffusion-DPO: a seed pair shares its eps
    assert checked and {stage for stage, *_ in events} == {"iter_0", "iter_1"}
    events.clear()
    run_saved_model(folder, tmp_path / "fresh", capsys, *whole)
    assert not any("chosen_noise" in p for p in json.loads(
        (tmp_path / "fresh" / "iter_1" / "pairs.json").read_text()))
    assert all(torch.equal(theta[:len(batch)], theta[len(batch):]) for _, batch, theta, _ in events)


def test_pair_noise_prior_is_refused_for_a_ddpm_model(tiny_base, tmp_path, capsys):
    assert sail.main(["--model", tiny_base, "--pair-noise", "prior", "--out", str(tmp_path / "o"),
                      *TINY_DATA]) == 2
    err = capsys.readouterr().err.strip()
    assert "--pair-noise prior: StableDiffusionPipeline is no flow-matching model" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
