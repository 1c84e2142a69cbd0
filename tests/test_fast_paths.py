"""The faster paths of a real-scale run (issue 29) compute what the plain ones do: the seed pairs'
VAE posteriors kept once a run (plumbing.Posteriors, --cache-posteriors), and Eq. DPO's reference
run in its own half precision outside autocast (plumbing.own_dtype)."""

import json

import pytest
import torch

import plumbing
import sail
from conftest import HERE, REAL_QUICK, TINY_DATA, cond_for, latents, perturbed, run_saved_model

SEED_IMAGES = [pair[key] for pair in plumbing.read_seed_pairs(HERE / "seed_pairs.json")[:6]
               for key in ("chosen", "rejected")]                             # 12 images


def counting_encodes(monkeypatch, vae):
    """The number of images each vae.encode call is given, in order."""
    calls, encode = [], vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: (calls.append(len(x)), encode(x, *a, **k))[1])
    return calls


def test_kept_posteriors_are_the_vaes_own_encoded_once_in_fixed_chunks(pipe, monkeypatch):
    calls = counting_encodes(monkeypatch, pipe.vae)
    kept = plumbing.Posteriors(pipe.vae, 16, SEED_IMAGES, chunk=4)
    wanted = [SEED_IMAGES[5], SEED_IMAGES[0], SEED_IMAGES[9]]  # in chunks 1, 0 and 2
    mean, std = kept(wanted)
    assert calls == [4, 4, 4] and mean.shape == std.shape == (3, 4, 8, 8)
    kept(SEED_IMAGES)  # every chunk is kept: the VAE does not run again
    assert calls == [4, 4, 4]
    # each row is what the VAE gives its chunk, bit for bit ...
    chunk_mean, chunk_std = plumbing.vae_posterior(pipe.vae, torch.stack(
        [plumbing.load_image(path, 16) for path in SEED_IMAGES[4:8]]))
    assert torch.equal(mean[0], chunk_mean[1]) and torch.equal(std[0], chunk_std[1])
    # ... whatever order the images are asked for in (a resumed run, another process)
    other = plumbing.Posteriors(pipe.vae, 16, SEED_IMAGES, chunk=4)
    again = other(list(reversed(SEED_IMAGES)))
    first = kept(list(reversed(SEED_IMAGES)))
    assert all(torch.equal(a, b) for a, b in zip(again, first))
    # ... and, with the step's posterior noise, the x_0 today's per-step encoding gives (the VAE
    # is not batch-invariant: float rounding apart)
    noise = latents(3, seed=5)
    per_step = plumbing.Posteriors(pipe.vae, 16)(wanted)
    torch.testing.assert_close(sail.posterior_sample(pipe.vae, mean, std, noise),
                               sail.posterior_sample(pipe.vae, *per_step, noise), rtol=0, atol=1e-5)


def test_images_outside_the_kept_set_are_encoded_at_each_call(pipe, monkeypatch):
    calls = counting_encodes(monkeypatch, pipe.vae)
    kept = plumbing.Posteriors(pipe.vae, 16, SEED_IMAGES[:4], chunk=4)
    heldout = SEED_IMAGES[4:7]
    for _ in range(2):
        kept(heldout)
    assert calls == [3, 3] and kept.kept == {}


def test_a_run_keeps_the_seed_pairs_posteriors_across_stages_and_trains_as_the_plain_path(
        tmp_path, capsys, monkeypatch, tiny_base):
    """A real model's default: each seed image is encoded once in the whole run (step 0 and
    iteration 1 both train on seed pairs), in whole chunks; the losses are the per-step
    encoding's, to rounding."""
    encoded = []
    encode = plumbing.Posteriors.encode
    monkeypatch.setattr(plumbing.Posteriors, "encode",
                        lambda self, paths: (encoded.append(list(paths)), encode(self, paths))[1])
    kept_run = tmp_path / "kept"
    run_saved_model(tiny_base, kept_run, capsys, "--heldout-pairs", "none")
    assert json.loads((kept_run / "config.json").read_text())["cache_posteriors"] is True
    order = list(dict.fromkeys(pair[key] for pair in plumbing.read_seed_pairs(
        HERE / "seed_pairs.json") for key in ("chosen", "rejected")))
    chunks = [order[i:i + 4] for i in range(0, len(order), 4)]  # 2 x --micro-batch 2
    assert encoded and all(paths in chunks for paths in encoded)
    assert len({tuple(paths) for paths in encoded}) == len(encoded)  # no chunk twice
    encoded.clear()
    plain_run = tmp_path / "plain"
    assert sail.main(["--model", tiny_base, "--out", str(plain_run), *REAL_QUICK, *TINY_DATA,
                      "--heldout-pairs", "none", "--no-cache-posteriors", "--iters", "0"]) == 0
    assert not any(paths in chunks for paths in encoded)  # a micro-batch's own images

    def losses(run, stage="iter_0"):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r.get("stage") == stage and "loss" in r and r.get("event") != "summary"]
    assert len(losses(kept_run)) == len(losses(kept_run, "iter_1")) == 3
    assert losses(kept_run) == pytest.approx(losses(plain_run), rel=1e-4)


def test_the_tiny_world_encodes_every_step_and_real_models_keep_posteriors(tiny_base):
    """The tiny world's numbers stay bit for bit those of per-step encoding (its default)."""
    assert sail.parse_args(["--tiny"]).cache_posteriors is False
    assert sail.parse_args(["--model", tiny_base]).cache_posteriors is True
    assert sail.parse_args(["--model", tiny_base, "--no-cache-posteriors"]).cache_posteriors is False


def conv_in_calls(unet):
    """(autocast on?, input dtype) of every call of the UNet's first layer."""
    seen = []
    unet.conv_in.register_forward_pre_hook(
        lambda _, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
    return seen


def test_a_half_precision_reference_runs_in_its_own_dtype_and_theta_under_autocast(pipe):
    """In a bf16 step, Eq. DPO's bf16 reference runs outside autocast on bf16 inputs (as the
    official code runs its fp16 reference) and theta (fp32 weights) under autocast; the timestep
    is not rounded to bf16; the reference errors move by bf16 rounding only."""
    theta = perturbed(pipe.unet)
    ref = plumbing.frozen_copy(pipe.unet, "bf16")
    seen_theta, seen_ref = conv_in_calls(theta), conv_in_calls(ref)
    timesteps = []  # what the UNet embeds: a flow model's float timestep must not become bf16
    ref.time_proj.register_forward_pre_hook(lambda _, args: timesteps.append(args[0].dtype))
    x0, noise = latents(4, seed=1), latents(4, seed=2)  # 2 winners then 2 losers
    t, cond = torch.tensor([10, 900]), cond_for(pipe, ["a red circle", "a blue square"])
    with plumbing.autocast(torch.device("cpu"), "bf16"):
        _, _, _, err_ref = sail.dpo_micro_batch(theta, ref, pipe.scheduler, x0, t, noise, cond, 5000.0)
        autocast_ref = sail.denoising_error(ref, pipe.scheduler, x0, noise, t.repeat(2),
                                            sail.map_cond(lambda v: torch.cat([v, v]), cond))
    assert seen_theta == [(True, torch.float32)]
    assert seen_ref == [(False, torch.bfloat16), (True, torch.float32)]
    assert err_ref.dtype == torch.float32
    torch.testing.assert_close(err_ref, autocast_ref, rtol=2e-2, atol=0)
    timesteps.clear()
    with plumbing.autocast(torch.device("cpu"), "bf16"), plumbing.own_dtype(ref):
        ref(latents(1), timestep=torch.tensor([999.25]), **cond_for(pipe, ["a red circle"]))
    assert timesteps == [torch.float32]


def test_references_in_fp32_or_of_mixed_dtypes_run_as_before(pipe):
    fp32 = plumbing.frozen_copy(pipe.unet)
    mixed = plumbing.frozen_copy(pipe.unet, "bf16")
    mixed.conv_out.float()  # as LoRA's fp32 adapters on a bf16 base
    for model in (fp32, mixed):
        seen = conv_in_calls(model)
        with plumbing.autocast(torch.device("cpu"), "bf16"), plumbing.own_dtype(model):
            model(latents(1), timestep=torch.tensor([5]), **cond_for(pipe, ["a red circle"]))
        assert seen == [(True, torch.float32)]
