"""Tests for sail.py. Each test names the formula or behaviour it pins and fails if that is wrong.

Run: python -m pytest -q test_sail.py   (about 3 minutes on 2 CPU cores, no GPU, no network).
The optional extras are tested when installed: matplotlib (plots), pyarrow and datasets
(Pick-a-Pic import), peft (LoRA).
Equation numbers are SPEC.md's, as in sail.py.
"""

import ast
import copy
import csv
import importlib.util
import inspect
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing network must not hang a local load

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                          T5Config, T5EncoderModel, T5Tokenizer)

import plumbing  # noqa: E402
import sail  # noqa: E402
import tiny_world  # noqa: E402

HERE = Path(__file__).parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # optional: the plots
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (optional: --lora-rank)")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """The Pick-a-Pic cache goes to a per-session folder, never the user's ~/.cache."""
    os.environ["SAIL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def run_from_the_repository(monkeypatch):
    """sail.py's default files (seed_pairs.json, prompts.txt) are relative to the working folder."""
    monkeypatch.chdir(HERE)


@pytest.fixture(scope="session")
def pipe(tmp_path_factory):
    """An untrained tiny Stable-Diffusion-shaped pipeline (random weights are enough for maths)."""
    torch.manual_seed(0)
    return tiny_world.build_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_base():
    return str(tiny_world.BASE)


AT_16PX = SimpleNamespace(resolution=16, guidance_scale=3.5)  # encode_text's settings in tests


def cond_for(pipe, prompts):
    with torch.no_grad():
        return sail.encode_text(pipe, prompts, AT_16PX)


def latents(n, seed=0):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # (n, 4, 8, 8)


def perturbed(unet, scale=0.05, seed=1):
    """A copy of `unet` with every weight nudged: a 'trained' theta different from ref."""
    other = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


# -------------------------------------------------------------------------------------------------
# Eq. F: forward noising and the prediction target
# -------------------------------------------------------------------------------------------------

def test_noisy_latents_match_eq_f_of_the_scheduler(pipe):
    x0, noise = latents(4), latents(4, seed=1)
    t = torch.tensor([0, 10, 500, 999])
    expected = pipe.scheduler.add_noise(x0, noise, t)  # diffusers' own implementation of Eq. F
    torch.testing.assert_close(sail.noisy_latents(pipe.scheduler, x0, noise, t), expected)


def test_target_follows_prediction_type(pipe):
    x0, noise = latents(3), latents(3, seed=1)
    t = torch.tensor([5, 300, 900])
    eps_scheduler = pipe.scheduler
    v_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    assert torch.equal(sail.diffusion_target(eps_scheduler, x0, noise, t), noise)
    torch.testing.assert_close(sail.diffusion_target(v_scheduler, x0, noise, t),
                               v_scheduler.get_velocity(x0, noise, t))


def test_denoising_error_is_mean_over_chw_per_sample(pipe):
    x0, noise, t = latents(2), latents(2, seed=1), torch.tensor([100, 700])
    cond = cond_for(pipe, ["a red circle", "a blue square"])
    with torch.no_grad():
        err = sail.denoising_error(pipe.unet, pipe.scheduler, x0, noise, t, cond)
        x_t = pipe.scheduler.add_noise(x0, noise, t)
        prediction = pipe.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    expected = torch.stack([((prediction[i] - noise[i]) ** 2).mean() for i in range(2)])
    assert err.shape == (2,)
    torch.testing.assert_close(err, expected)


# -------------------------------------------------------------------------------------------------
# Eq. DPO: the Diffusion-DPO loss
# -------------------------------------------------------------------------------------------------

def test_dpo_loss_is_ln2_when_theta_equals_ref(pipe):
    x0, noise = latents(8), latents(8, seed=1)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    cond = cond_for(pipe, ["a red circle"] * 8)
    with torch.no_grad():
        err = sail.denoising_error(pipe.unet, pipe.scheduler, x0, noise, t, cond)
    ref = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        err_ref = sail.denoising_error(ref, pipe.scheduler, x0, noise, t, cond)
    loss, inside = sail.dpo_loss(err[:4], err[4:], err_ref[:4], err_ref[4:], beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(inside == 0)


def test_dpo_loss_falls_when_theta_lowers_winner_error_and_rises_for_loser():
    ref_w, ref_l = torch.tensor([0.30]), torch.tensor([0.30])
    better_on_winner = sail.dpo_loss(torch.tensor([0.29]), torch.tensor([0.30]), ref_w, ref_l, 5000)
    better_on_loser = sail.dpo_loss(torch.tensor([0.30]), torch.tensor([0.29]), ref_w, ref_l, 5000)
    assert better_on_winner[0] < math.log(2) < better_on_loser[0]
    assert better_on_winner[1].item() > 0 > better_on_loser[1].item()


def test_dpo_loss_gradient_pushes_winner_error_down_and_loser_error_up():
    err_w = torch.tensor([0.2, 0.5], requires_grad=True)
    err_l = torch.tensor([0.3, 0.1], requires_grad=True)
    loss, _ = sail.dpo_loss(err_w, err_l, torch.tensor([0.25, 0.4]), torch.tensor([0.2, 0.3]), 10.0)
    loss.backward()
    assert torch.all(err_w.grad > 0)  # gradient descent lowers theta's error on winners
    assert torch.all(err_l.grad < 0)  # and raises it on losers


def test_dpo_loss_matches_independent_computation_with_beta_over_two():
    generator = torch.Generator().manual_seed(0)
    errs = [0.1 + 0.01 * torch.rand(6, generator=generator, dtype=torch.float64) for _ in range(4)]
    beta = 5000.0
    loss, inside = sail.dpo_loss(*errs, beta)
    ew, el, rw, rl = (e.tolist() for e in errs)
    # -log sigma(z) = log(1 + exp(-z)), z = -(beta/2)[(ew - el) - (rw - rl)], written out by hand
    z = [-(beta / 2) * ((ew[i] - el[i]) - (rw[i] - rl[i])) for i in range(6)]
    expected = sum(math.log1p(math.exp(-zi)) for zi in z) / 6
    assert inside.tolist() == pytest.approx(z, rel=1e-9)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def dpo_run(folder, args):
    """A Run for calling diffusion_dpo directly; its metrics.jsonl lines are the step records."""
    run = sail.Run(folder, args)
    run.open_log()
    return run


def test_diffusion_dpo_gives_winner_and_loser_the_same_t_and_noise(pipe, monkeypatch, tmp_path):
    calls = []
    real = sail.denoising_error

    def spy(unet, scheduler, x0, noise, t, cond):
        calls.append((x0.clone(), noise.clone(), t.clone()))
        return real(unet, scheduler, x0, noise, t, cond)

    monkeypatch.setattr(sail, "denoising_error", spy)
    args = sail.Args(tiny=True, precision="fp32", **{**sail.TINY_PRESET, "dpo_steps": 1,
                                                     "micro_batch": 4, "effective_batch": 4})
    pairs = plumbing.read_seed_pairs(HERE / "seed_pairs.json")[:4]
    theta = copy.deepcopy(pipe)
    sail.diffusion_dpo(theta, sail.frozen_copy(pipe.unet), pairs, args, "iter_0",
                       dpo_run(tmp_path, args))
    assert len(calls) == 2  # theta and ref, each once on the concatenated (winners, losers) batch
    for x0, noise, t in calls:
        b = x0.shape[0] // 2
        assert torch.equal(noise[:b], noise[b:]) and torch.equal(t[:b], t[b:])
        assert not torch.equal(x0[:b], x0[b:])  # winners and losers are different images
    assert torch.equal(calls[0][1], calls[1][1]) and torch.equal(calls[0][2], calls[1][2])


def test_diffusion_dpo_trains_theta_and_leaves_ref_frozen(pipe, tmp_path):
    args = sail.Args(tiny=True, precision="fp32", **{**sail.TINY_PRESET, "dpo_steps": 2,
                                                     "micro_batch": 4, "effective_batch": 8,
                                                     "lr": 1e-3})
    pairs = plumbing.read_seed_pairs(HERE / "seed_pairs.json")[:8]
    theta, ref = copy.deepcopy(pipe), sail.frozen_copy(pipe.unet)
    before = [p.clone() for p in ref.parameters()]
    summary = sail.diffusion_dpo(theta, ref, pairs, args, "iter_0", dpo_run(tmp_path, args))
    steps = records(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), theta.unet.parameters()))
    assert [r["step"] for r in steps] == [1, 2]
    # the first step starts at theta == ref: every logit is 0, the loss is exactly ln 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert set(summary) == {"loss", "implicit_acc", "rewards/chosen", "rewards/rejected",
                            "rewards/margins"}


# -------------------------------------------------------------------------------------------------
# Eq. 8 and Eq. 9: the implicit reward and the preference it implies
# -------------------------------------------------------------------------------------------------

def reward(unet, ref, x, pipe, seed=0, **kwargs):
    cond = cond_for(pipe, ["a red circle"])["encoder_hidden_states"]  # (1, L, D)
    return sail.implicit_reward(unet, ref, x, cond, pipe.scheduler, 5000.0, 10,
                                torch.Generator().manual_seed(seed), **kwargs)


def test_implicit_reward_is_zero_when_unet_is_ref(pipe):
    r = reward(pipe.unet, pipe.unet, latents(8), pipe)
    assert r.shape == (8,)
    assert torch.all(r == 0)


def test_implicit_reward_flips_sign_when_unet_and_ref_swap(pipe):
    theta = perturbed(pipe.unet)
    forward = reward(theta, pipe.unet, latents(5), pipe)
    swapped = reward(pipe.unet, theta, latents(5), pipe)
    assert forward.abs().min() > 0
    torch.testing.assert_close(swapped, -forward)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_implicit_reward_matches_a_loop_over_candidates_and_draws(pipe, prediction_type):
    """Eq. 8 written as a plain double loop with diffusers' add_noise and get_velocity: an
    independent check, for both targets (an epsilon target fails the v_prediction case)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    theta, x = perturbed(pipe.unet), latents(3)
    k, beta = 4, 5000.0
    cond = cond_for(pipe, ["a red circle"])["encoder_hidden_states"]
    batched = sail.implicit_reward(theta, pipe.unet, x, cond, scheduler, beta, k,
                                   torch.Generator().manual_seed(7), batch_size=5)
    generator = torch.Generator().manual_seed(7)  # the same K draws, taken in the same order
    t = torch.randint(0, 1000, (k,), generator=generator)
    noise = torch.randn((k, 4, 8, 8), generator=generator)
    expected = []
    with torch.no_grad():
        for n in range(3):
            total = 0.0
            for j in range(k):
                x0, eps, tj = x[n:n + 1], noise[j:j + 1], t[j:j + 1]
                x_t = scheduler.add_noise(x0, eps, tj)
                target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, tj)
                e_theta = ((theta(x_t, tj, cond).sample - target) ** 2).mean()
                e_ref = ((pipe.unet(x_t, tj, cond).sample - target) ** 2).mean()
                total += (e_theta - e_ref).item()
            expected.append(-(beta / 2) * total / k)
    assert batched.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_implicit_reward_shares_draws_across_candidates(pipe):
    """Common random numbers (SPEC 2a): identical candidates get identical rewards."""
    theta = perturbed(pipe.unet)
    x = latents(4)
    x[3] = x[0]
    r = reward(theta, pipe.unet, x, pipe)
    assert r[0].item() == pytest.approx(r[3].item(), rel=1e-5)
    assert r[0].item() != pytest.approx(r[1].item(), rel=1e-3)


def test_reward_prefers_image_the_model_was_trained_towards(pipe):
    """A few denoising steps towards candidate 2 make Eq. 8 rank it first among 8."""
    x = latents(8, seed=3)
    target = 2
    theta = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(theta.parameters(), lr=1e-3)
    cond = cond_for(pipe, ["a red circle"] * 16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        noise = torch.randn((16, 4, 8, 8), generator=generator)
        t = torch.randint(0, 1000, (16,), generator=generator)
        x0 = x[target:target + 1].expand(16, -1, -1, -1)
        loss = sail.denoising_error(theta, pipe.scheduler, x0, noise, t, cond).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theta.eval()
    r = reward(theta, pipe.unet, x, pipe, seed=11)
    assert int(r.argmax()) == target
    assert sail.best_worst_pair(r)[0] == target


def test_preference_probability_is_sigmoid_of_reward_difference():
    p = sail.preference_probability(torch.tensor(2.0), torch.tensor(0.5))
    assert p.item() == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert sail.preference_probability(torch.tensor(0.5), torch.tensor(2.0)).item() < 0.5


# -------------------------------------------------------------------------------------------------
# Self-labelling: best-worst pairs, ties, random pairs
# -------------------------------------------------------------------------------------------------

def test_best_worst_pair_is_the_most_confident_of_all_pairs():
    rewards = torch.tensor([0.3, -1.2, 2.5, 0.0, 1.1])
    best, worst = sail.best_worst_pair(rewards)
    assert (best, worst) == (2, 1)
    most_confident = max(((a, b) for a in range(5) for b in range(5) if a != b),
                         key=lambda ab: sail.preference_probability(rewards[ab[0]], rewards[ab[1]]))
    assert most_confident == (best, worst)


def test_best_worst_pair_is_none_when_all_rewards_tie():
    assert sail.best_worst_pair(torch.full((8,), 0.75)) is None
    assert sail.best_worst_pair(torch.tensor([1.0, 1.0 + 1e-9, 1.0])) is None
    assert sail.best_worst_pair(torch.tensor([1.0, 1.001])) == (1, 0)


def test_random_pair_labels_the_higher_reward_the_winner():
    rewards = torch.tensor([0.3, -1.2, 2.5, 0.0, 1.1, 0.7, -0.4, 1.9])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        winner, loser = sail.random_pair(rewards, generator)
        assert winner != loser and rewards[winner] > rewards[loser]
        seen.add((winner, loser))
    assert len(seen) > 5  # really random, not always best-worst
    assert sail.random_pair(torch.zeros(4), generator) is None


# -------------------------------------------------------------------------------------------------
# Ranked preference mixup
# -------------------------------------------------------------------------------------------------

def self_pairs(margins):
    return [{"prompt": f"p{i}", "reward_chosen": m, "reward_rejected": 0.0, "confidence": 0.0}
            for i, m in enumerate(margins)]


SEEDS = [{"prompt": f"seed{i}"} for i in range(100)]


def test_ranked_mixup_makes_alpha_of_the_pairs_self_labelled():
    mixed = sail.ranked_mixup(self_pairs([0.1 * i for i in range(10)]), SEEDS, 0.25, random.Random(0))
    n_self = sum("reward_chosen" in p for p in mixed)
    assert len(mixed) == 40 and n_self == 10  # |D_i| = |S_i| / alpha
    assert n_self / len(mixed) == pytest.approx(0.25)
    seeds = [p["prompt"] for p in mixed if "reward_chosen" not in p]
    assert len(set(seeds)) == 30  # drawn without replacement


def test_ranked_mixup_without_mixup_is_only_self_pairs():
    mixed = sail.ranked_mixup(self_pairs([1.0, 2.0, 3.0]), SEEDS, 1.0, random.Random(0))
    assert len(mixed) == 3 and all("reward_chosen" in p for p in mixed)


def test_ranked_mixup_ranks_by_confidence_and_keeps_the_top():
    margins = [0.5, 3.0, -0.2, 1.5, 2.0, 0.1]
    mixed = sail.ranked_mixup(self_pairs(margins), SEEDS, 0.5, random.Random(0), keep_top=0.5)
    kept = [p["reward_chosen"] for p in mixed if "reward_chosen" in p]
    assert kept == [3.0, 2.0, 1.5]  # the three most confident, most confident first
    assert len(mixed) == 6


def test_ranked_mixup_draws_seed_pairs_with_replacement_only_when_too_few():
    mixed = sail.ranked_mixup(self_pairs([1.0] * 10), SEEDS[:5], 0.25, random.Random(0))
    assert len(mixed) == 40 and sum("reward_chosen" not in p for p in mixed) == 30


# -------------------------------------------------------------------------------------------------
# The tiny world
# -------------------------------------------------------------------------------------------------

def test_tiny_world_images_show_their_prompt_and_the_annotator_prefers_big_bright_centred():
    prompts = [p for p in tiny_world.PROMPTS for _ in range(10)]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    assert images.shape == (180, 3, 16, 16)
    assert tiny_world.fidelity(images, prompts).float().mean() > 0.9
    big = torch.zeros(1, 3, 16, 16)
    big[:, 0, 3:13, 3:13] = 1.0
    small = torch.zeros(1, 3, 16, 16)
    small[:, 0, 0:4, 0:4] = 0.6
    assert tiny_world.annotator_score(big, ["a red square"]) > tiny_world.annotator_score(small, ["a red square"])
    assert tiny_world.annotator_score(big, ["a blue square"]) < 1  # wrong colour earns nothing
    blob = torch.ones(1, 3, 16, 16) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    assert not tiny_world.fidelity(blob, ["a red square"])[0]  # a screen of paint is not a square


def test_seed_pairs_command_rebuilds_the_shipped_pairs_bit_identical(tmp_path, capsys):
    assert tiny_world.main(["seed-pairs", "--out", str(tmp_path / "pairs")]) == 0
    assert "the seed and held-out pairs: bit-identical to the shipped" in capsys.readouterr().out
    assert tiny_world.main(["seed-pairs", "--out", str(tmp_path / "pairs")]) == 2  # never overwrites


def test_shipped_tiny_base_comparison_names_a_changed_weight(tmp_path):
    from safetensors.torch import load_file, save_file
    copy_of = tmp_path / "base"
    shutil.copytree(tiny_world.BASE, copy_of)
    assert tiny_world.differences(copy_of, tiny_world.BASE) == []
    weights = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    found = tiny_world.differences(copy_of, tiny_world.BASE)
    assert len(found) == 1 and "unet/diffusion_pytorch_model.safetensors" in found[0] and "0.001" in found[0]


def test_pretrain_command_writes_a_loadable_tiny_base(tmp_path, capsys):
    assert tiny_world.main(["pretrain", "--steps", "2", "--out", str(tmp_path / "base")]) == 0
    assert "pretrained the tiny base" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the world's latents
    assert sorted(p.name for p in (tmp_path / "base" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_tiny_tokenizer_gives_one_token_per_word(tmp_path):
    tokenizer = tiny_world.tokenizer(tmp_path)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a magenta triangle").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "magenta</w>", "triangle</w>", "<|endoftext|>"]


def test_shipped_seed_pairs_are_annotator_labelled_on_seen_prompts_only():
    pairs = plumbing.read_seed_pairs(HERE / "seed_pairs.json")
    assert len(pairs) == tiny_world.N_SEED_PAIRS
    assert {p["prompt"] for p in pairs} == set(tiny_world.SEEN)
    prompts = [p["prompt"] for p in pairs]
    chosen = torch.stack([plumbing.load_image(p["chosen"], 16) for p in pairs]) / 2 + 0.5
    rejected = torch.stack([plumbing.load_image(p["rejected"], 16) for p in pairs]) / 2 + 0.5
    assert torch.all(tiny_world.annotator_score(chosen, prompts) > tiny_world.annotator_score(rejected, prompts))


# -------------------------------------------------------------------------------------------------
# The real path: what trains is what was judged, precision, schedules, held-out data
# -------------------------------------------------------------------------------------------------

def spy(monkeypatch, name, calls):
    """Record every call of sail.<name> as (args, kwargs, result) and pass it through."""
    real = getattr(sail, name)

    def spied(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result
    monkeypatch.setattr(sail, name, spied)
    return calls


def test_self_labelled_pairs_train_on_the_exact_latents_eq8_judged(tmp_path, tiny_base,
                                                                    monkeypatch):
    judged, trained = spy(monkeypatch, "implicit_reward", []), spy(monkeypatch, "training_latents", [])
    out = tmp_path / "run"
    assert sail.main([*RESUMABLE, "--out", str(out)]) == 0
    pairs = [sail.pair_paths(p, lambda name: str(out / "iter_1" / name))
             for p in json.loads((out / "iter_1" / "pairs.json").read_text())]
    ranked = [(candidates, rewards) for (_, _, candidates, *_), _, rewards in judged
              if len(candidates) == 3]  # the N = 3 candidates of a prompt (held-out calls: 2P)
    assert len(ranked) == 4 and len(pairs) >= 1
    for pair in pairs:  # the saved latents are the candidates Eq. 8 ranked best and worst
        x_w, x_l = (torch.load(pair[f"{key}_latents"]) for key in ("chosen", "rejected"))
        assert any(torch.equal(c[r.argmax()], x_w) and torch.equal(c[r.argmin()], x_l)
                   for c, r in ranked)
    self_rows = 0
    for (_, batch, *_), _, x0 in trained:  # ... and what DPO trains on, bit for bit
        for i, pair in enumerate(batch):
            if "chosen_latents" in pair:
                saved = [torch.load(pair[f"{key}_latents"]) for key in ("chosen", "rejected")]
                assert torch.equal(x0[i], saved[0]) and torch.equal(x0[len(batch) + i], saved[1])
                self_rows += 1
    assert self_rows > 0


def test_eq8_rounding_spread_at_theta_equal_ref_is_zero_in_fp32_and_small_in_fp16(pipe):
    """At theta == ref every reward is 0: any spread there is rounding (--reward-precision)."""
    theta, x = copy.deepcopy(pipe.unet), latents(8)

    def spread(model, precision):
        ref = sail.frozen_copy(pipe.unet, precision)
        with sail.autocast(torch.device("cpu"), precision):
            r = reward(model, ref, x, pipe)
        return (r.max() - r.min()).item()

    real = spread(perturbed(theta, scale=0.01), "fp32")  # a model that has moved a little
    assert spread(theta, "fp32") == 0
    assert spread(theta, "fp16") < 0.05 * real


def test_learning_rate_warms_up_linearly_at_most_a_quarter_of_the_stage(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert sail.main(["--tiny", "--iters", "0", "--dpo-steps", "12", "--warmup-steps", "500",
                      "--effective-batch", "4", "--micro-batch", "4", "--eval-seeds", "1",
                      "--heldout-pairs", "none", "--out", str(out)]) == 0
    lrs = [r["lr"] for r in records(out) if "step" in r]  # warm-up min(500, 12 // 4) = 3 steps
    assert lrs == pytest.approx([3e-5 * f for f in (0.25, 0.5, 0.75)] + [3e-5] * 9)


def test_presets_follow_the_official_warmup_per_family(tiny_base, tmp_path):
    build_tiny_sdxl(tmp_path / "sdxl", tiny_base)
    assert sail.parse_args(["--model", tiny_base]).warmup_steps == 500          # SD 1.5
    assert sail.parse_args(["--model", str(tmp_path / "sdxl")]).warmup_steps == 200  # SDXL


def test_sampler_never_clips_latents_unless_the_model_config_says_so(pipe):
    from diffusers import EulerDiscreteScheduler
    pipe = copy.copy(pipe)
    for sampler in ("ddim", "ddpm"):
        pipe.scheduler = EulerDiscreteScheduler()  # SDXL's: its config has no clip_sample
        sail.set_sampler(pipe, argparse_like(sampler=sampler))
        assert pipe.scheduler.config.clip_sample is False
        pipe.scheduler = DDPMScheduler(clip_sample=True)  # a config that asks for it keeps it
        sail.set_sampler(pipe, argparse_like(sampler=sampler))
        assert pipe.scheduler.config.clip_sample is True


def argparse_like(**settings):
    return type("Settings", (), settings)


def test_an_unknown_flag_is_named_with_the_closest_one_exit_2(capsys):
    assert sail.main(["--itrs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown flag --itrs (did you mean --iters?); python sail.py --help "
                   "lists every flag"]


def test_held_out_pairs_are_a_fixed_five_percent_never_trained_on():
    pairs = [{"prompt": f"p{i}"} for i in range(400)]
    args = argparse_like(heldout_pairs=None, seed=0)
    train, held = plumbing.split_heldout(pairs, args)
    assert len(held) == 20 and len(train) == 380
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    assert plumbing.split_heldout(pairs, args) == (train, held)  # seeded: the same every run
    assert plumbing.split_heldout(pairs[:19], args) == (pairs[:19], [])  # too few to spare 5%
    assert len(plumbing.split_heldout(pairs * 30, args)[1]) == 500  # at most 500


def test_judge_agreement_is_one_minus_itself_on_flipped_pairs_and_half_at_theta_equal_ref(pipe):
    held = plumbing.read_seed_pairs(HERE / "heldout_pairs.json")[:6]
    args = argparse_like(seed=0, resolution=16, reward_batch=40, k_draws=2, beta=5000.0,
                         reward_precision="fp32")
    theta = copy.deepcopy(pipe)
    theta.unet = perturbed(pipe.unet, scale=0.05)
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in held]
    agree = sail.judge_agreement(theta, pipe.unet, held, args)
    assert sail.judge_agreement(theta, pipe.unet, flipped, args) == pytest.approx(1 - agree)
    assert 0 < agree < 1  # the perturbed model has an opinion, right on some pairs only
    assert sail.judge_agreement(pipe, pipe.unet, held, args) == 0.5  # theta == ref: all ties


def test_real_models_evaluate_on_prompts_no_stage_trains_on():
    seed = [{"prompt": "a"}, {"prompt": "b"}]
    prompts = ["a", "c", "d", "e", "f", "g", "b", "h"]
    args = argparse_like(tiny=False, prompts="prompts.txt")
    train, held = plumbing.split_eval_prompts(prompts, seed, args)
    assert held == ["e", "f", "g", "h"] and train == ["a", "c", "d", "b"]
    with pytest.raises(sail.InputError, match="none is left to evaluate on"):
        plumbing.split_eval_prompts(["a", "b"], seed, args)


def write_pickapic_dataset(folder, n):
    datasets = pytest.importorskip("datasets")
    rows = pickapic_rows(n)
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    datasets.Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(columns)}
                               ).save_to_disk(folder)


def test_a_real_model_without_data_flags_trains_on_a_cached_pickapic_subset(
        tmp_path, tiny_base, monkeypatch, capsys):
    import pickapic
    write_pickapic_dataset(tmp_path / "pickapic", 40)
    monkeypatch.setattr(plumbing, "PICKAPIC_SEED_PAIRS", 8)
    flags = ["--model", tiny_base, "--pickapic-dataset", str(tmp_path / "pickapic"), *REAL_QUICK]
    assert sail.main([*flags, "--out", str(tmp_path / "one")]) == 0
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    seed_pairs = plumbing.read_seed_pairs(config["seed_pairs"])
    prompts = plumbing.read_prompts(config["prompts"])
    assert len(seed_pairs) == 8 and len(prompts) == 1 * 4 + plumbing.EVAL_PROMPTS
    assert not {p["prompt"] for p in seed_pairs} & set(prompts)  # prompts are other captions
    monkeypatch.setattr(pickapic, "open_dataset", None)  # the second run reads the cache only
    assert sail.main([*flags, "--out", str(tmp_path / "two")]) == 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["seed_pairs"] == config["seed_pairs"]


def test_a_real_model_without_data_or_datasets_exits_2_naming_both_fixes(
        tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    assert sail.main(["--model", tiny_base, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install datasets" in err[0] and "--seed-pairs" in err[0]
    assert not (tmp_path / "run").exists()


def test_every_prompt_tied_says_why_and_what_to_change(tmp_path, tiny_base, capsys):
    assert sail.main(["--tiny", "--iters", "1", "--lr", "1e-30", *QUICK, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "equal within float tolerance" in out and "Raise --lr or --dpo-steps" in out


# -------------------------------------------------------------------------------------------------
# Whole runs: the tiny world, and the real-SD loading path on a saved pipeline
# -------------------------------------------------------------------------------------------------

QUICK = ["--dpo-steps", "3", "--n-candidates", "3", "--k-draws", "2", "--prompts-per-iter", "4",
         "--eval-seeds", "1", "--effective-batch", "8", "--micro-batch", "8"]


def test_tiny_run_writes_every_output_and_its_unet_loads_back(tmp_path, tiny_base):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "sail.py", "--tiny", "--iters", "1", "--out", str(out),
         *QUICK],
        cwd=HERE, capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("sail: embedded tiny world")
    config = json.loads((out / "config.json").read_text())
    assert config["n_candidates"] == 3 and config["tiny"] is True and config["lr"] == 3e-5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["stage"] for r in steps] == ["iter_0"] * 3 + ["iter_1"] * 3
    for name in ("loss", "implicit_acc", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert all(math.isfinite(r[name]) for r in steps)
    summaries = {r["stage"]: r for r in records if r.get("event") == "summary"}
    assert list(summaries) == ["base", "iter_0", "iter_1"]
    assert all(0 <= s["annotator"] <= 100 for s in summaries.values())
    assert 0 <= summaries["iter_1"]["self_label_acc"] <= 1
    for stage in ("base", "iter_0", "iter_1"):
        assert (out / stage / "grid.png").exists()
    self_labelled = plumbing.read_seed_pairs(out / "iter_1" / "pairs.json")  # the seed-pair format
    assert len(self_labelled) == summaries["iter_1"]["self_pairs"] <= 4
    raw = json.loads((out / "iter_1" / "pairs.json").read_text())
    assert all(p["reward_chosen"] > p["reward_rejected"] for p in raw)
    unet = UNet2DConditionModel.from_pretrained(out / "iter_1" / "unet")
    loaded = StableDiffusionPipeline.from_pretrained(out / "tiny_base", unet=unet)
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a red circle", num_inference_steps=2, height=16, width=16,
                   output_type="pt").images
    assert image.shape == (1, 3, 16, 16)


REAL_QUICK = [*QUICK, "--iters", "1", "--resolution", "16", "--sample-steps", "2",
              "--effective-batch", "4", "--micro-batch", "2", "--generation-batch", "6"]
# a real model's data is Pick-a-Pic unless given: these runs take the tiny world's files
TINY_DATA = ["--seed-pairs", str(HERE / "seed_pairs.json"), "--prompts", str(HERE / "prompts.txt")]


def run_saved_model(model, out, capsys, *flags, lr=4e-8):
    """sail.py --model <folder>: the code path of a real SD checkpoint, on a tiny saved pipeline."""
    code = sail.main(["--model", str(model), "--out", str(out), *REAL_QUICK, *TINY_DATA, *flags])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == f"sail: {model} on cpu"
    config = json.loads((out / "config.json").read_text())
    assert config["tiny"] is False and config["lr"] == pytest.approx(lr)  # 1e-8 x batch rule
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["stage"] == "base"
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: theta == ref
    summaries = [r for r in records if r.get("event") == "summary"]
    assert [s["stage"] for s in summaries] == ["base", "iter_0", "iter_1"]
    assert "annotator" not in summaries[-1]  # no simulated annotator outside the tiny world
    return config


def test_model_flag_runs_the_real_sd_code_path_on_a_saved_pipeline(tmp_path, tiny_base, capsys):
    model = tmp_path / "saved-pipeline"
    shutil.copytree(tiny_base, model)
    config = run_saved_model(model, tmp_path / "run", capsys)
    assert config["optimizer"] == "adamw" and config["sampler"] == "ddpm"  # the SD 1.5 settings
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "iter_1" / "unet")
    assert unet.config.sample_size == 8


def test_v_prediction_model_runs_end_to_end(tmp_path, tiny_base, capsys):
    model = tmp_path / "v-pipeline"
    shutil.copytree(tiny_base, model)
    scheduler_config = model / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_config.read_text())
    scheduler_config.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    run_saved_model(model, tmp_path / "run", capsys)


def build_tiny_sdxl(folder, tiny_base):
    """An SDXL-shaped pipeline from configs: two text encoders, pooled embeddings, time ids."""
    base = StableDiffusionPipeline.from_pretrained(tiny_base)
    text_config = base.text_encoder.config.to_dict()
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**text_config, "projection_dim": 32}))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=8,
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)  # pooled (32) + 6 time ids x 8
    StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer, unet=unet,
        scheduler=base.scheduler).save_pretrained(folder)


def test_sdxl_model_runs_end_to_end_with_the_sdxl_preset(tmp_path, tiny_base, capsys):
    model = tmp_path / "sdxl-pipeline"
    build_tiny_sdxl(model, tiny_base)
    config = run_saved_model(model, tmp_path / "run", capsys)
    # the paper's SDXL settings from SDXL_PRESET; flags on the command line still win
    assert (config["optimizer"], config["sampler"], config["guidance_scale"]) == ("adafactor", "ddim", 5.0)
    assert (config["iters"], config["sample_steps"]) == (1, 2)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "iter_1" / "unet")
    pipe = StableDiffusionXLPipeline.from_pretrained(model, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)


@needs_peft
def test_sdxl_lora_run_saves_adapters_its_pipeline_loads(tmp_path, tiny_base, capsys):
    model = tmp_path / "sdxl-pipeline"
    build_tiny_sdxl(model, tiny_base)
    run = tmp_path / "run"
    run_saved_model(model, run, capsys, "--lora-rank", "4", lr=plumbing.LORA_LR["real"])
    assert not (run / "iter_1" / "unet").exists()  # the merged UNet only with --save-merged
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for stage in ("iter_0", "iter_1"):
        pipe.load_lora_weights(run / stage / "lora", adapter_name=stage)
    pipe.set_adapters(["iter_0", "iter_1"])
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)


def test_sdxl_conditioning_has_pooled_embeddings_and_time_ids(tmp_path, tiny_base):
    build_tiny_sdxl(tmp_path / "sdxl", tiny_base)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "sdxl")
    cond = sail.encode_text(pipe, ["a red circle", ""], AT_16PX)
    assert cond["encoder_hidden_states"].shape == (2, 8, 64)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    err = sail.denoising_error(pipe.unet, pipe.scheduler, latents(2), latents(2, seed=1),
                               torch.tensor([10, 900]), cond)
    loss, _ = sail.dpo_loss(err[:1], err[1:], err[:1], err[1:], 5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


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


def test_flow_noising_target_and_timestep_follow_eq_rf():
    """Eq. RF against its own formulas: SD3's schedule shifts sigma = s by 3 s / (1 + 2 s)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t = latents(3), latents(3, seed=1), torch.tensor([0, 500, 999])
    s = (1000 - t.double()) / 1000                           # index t: unshifted sigma 1 .. 1/1000
    sigma = (3 * s / (1 + 2 * s)).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(sail.noisy_latents(scheduler, x0, noise, t),
                               (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(sail.diffusion_target(scheduler, x0, noise, t), noise - x0)
    torch.testing.assert_close(sail.model_time(scheduler, t), sigma.flatten() * 1000)


def test_velocity_error_is_noise_error_over_one_minus_sigma_squared():
    """The README's derivation: x_0 and eps both lie on x_t's line with slope v, so a predicted v
    gives eps-hat - eps = (1 - sigma)(v-hat - v): Eq. DPO on noise errors would weight each
    velocity error by (1 - sigma)^2 (Flow-DPO's beta_t); sail.py keeps beta constant."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise, t = latents(4), latents(4, seed=1), torch.tensor([3, 250, 600, 990])
    sigma = scheduler.sigmas[t].view(-1, 1, 1, 1)
    x_t = sail.noisy_latents(scheduler, x0, noise, t)
    v = sail.diffusion_target(scheduler, x0, noise, t)
    torch.testing.assert_close(x_t - sigma * v, x0)             # x_0 = x_t - sigma v
    torch.testing.assert_close(x_t + (1 - sigma) * v, noise)    # eps = x_t + (1 - sigma) v
    v_hat = v + latents(4, seed=2)
    noise_hat = x_t + (1 - sigma) * v_hat
    torch.testing.assert_close(((noise_hat - noise) ** 2).mean(dim=(1, 2, 3)),
                               (1 - sigma.flatten()) ** 2 * ((v_hat - v) ** 2).mean(dim=(1, 2, 3)))


def test_flow_timesteps_are_drawn_logit_normal_and_sd_timesteps_uniformly():
    flow, ddpm = FlowMatchEulerDiscreteScheduler(shift=3.0), DDPMScheduler()
    drawn = sail.draw_timesteps(flow, 20000, torch.Generator().manual_seed(0))
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(drawn, (u * 1000).long())                # t = floor(1000 u), u logit-normal
    assert abs((drawn < 500).float().mean().item() - 0.5) < 0.02  # symmetric around the middle
    assert (drawn < 100).float().mean().item() < 0.02           # few at the ends, unlike U{0..999}
    sd = sail.draw_timesteps(ddpm, 50, torch.Generator().manual_seed(0))
    assert torch.equal(sd, torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(0)))


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
        torch.testing.assert_close(sail.encode_images(vae, images, noise), expected)


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
    pipe = load_flow(flow_model)
    for stage in ("iter_0", "iter_1"):
        pipe.load_lora_weights(run / stage / "lora", adapter_name=stage)
    pipe.set_adapters(["iter_0", "iter_1"])
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)


def test_a_killed_flux_run_resumed_by_torchrun_computes_what_one_process_does(tmp_path, monkeypatch,
                                                                             capsys):
    """FLUX killed at iter_1's third DPO step, finished by 2 processes from its checkpoint and
    iter_0's saved transformer: the result is one process's (fp32: at beta = 5000, bf16 rounding
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
# Bad input: one line naming the file, the entry and the problem; exit 2; earlier output untouched
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def earlier_run(tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    return out


def write_pairs(tmp_path, content):
    path = tmp_path / "pairs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    shutil.copytree(HERE / "seed_images", tmp_path / "seed_images")
    return path


GOOD = {"prompt": "a red circle", "chosen": "seed_images/000_chosen.png",
        "rejected": "seed_images/000_rejected.png"}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ([], "non-empty JSON list"),
    ([GOOD, {"prompt": "a red circle", "chosen": "seed_images/000_chosen.png"}],
     "entry 1: key 'rejected' missing"),
    ([{**GOOD, "chosen": "seed_images/nope.png"}], "entry 0: chosen image seed_images/nope.png missing"),
    ([{**GOOD, "rejected": "broken.png"}], "entry 0: rejected image broken.png missing or unreadable"),
    ([{**GOOD, "prompt": "a pink dog"}], "entry 0: 'a pink dog' is not a tiny-world prompt"),
])
def test_bad_seed_pairs_file(tmp_path, earlier_run, capsys, content, message):
    path = write_pairs(tmp_path, content)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = sail.main(["--tiny", "--seed-pairs", str(path), "--out", str(earlier_run)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and message in err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("text, message", [
    ("", "no prompts"),
    ("# only a comment\n\n   \n", "no prompts"),
    ("a red circle\na blue square\n", "2 prompts to train on, but 2 iterations x 18 prompts need 36"),
])
def test_bad_prompts_file(tmp_path, earlier_run, capsys, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    code = sail.main(["--tiny", "--iters", "2", "--prompts", str(path), "--out", str(earlier_run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(path) in err and message in err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("flags, message", [
    (["--n-candidates", "1"], "--n-candidates (N) must be >= 2"),
    (["--k-draws", "0"], "--k-draws (K) must be >= 1"),
    (["--mix-alpha", "0"], "--mix-alpha must be in (0, 1]"),
    (["--mix-alpha", "1.5"], "--mix-alpha must be in (0, 1]"),
    (["--iters", "-1"], "--iters must be >= 0"),
    (["--effective-batch", "10", "--micro-batch", "4"], "multiple of --micro-batch"),
])
def test_bad_flag_values(earlier_run, capsys, flags, message):
    code = sail.main(["--tiny", "--out", str(earlier_run), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--tiny", "--pairs", "sideways"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_existing_output_folder_is_never_overwritten(earlier_run, capsys):
    code = sail.main(["--tiny", "--out", str(earlier_run)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"


def test_unloadable_model_says_so_in_one_line_and_names_tiny(tmp_path, capsys):
    code = sail.main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "could not load --model" in err and "--tiny" in err
    assert not (tmp_path / "o").exists()


def test_unsupported_pipeline_class_is_named(tmp_path, capsys, tiny_base):
    model = tmp_path / "other"
    shutil.copytree(tiny_base, model)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    code = sail.main(["--model", str(model), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "StableDiffusionImg2ImgPipeline is not supported" in err


# -------------------------------------------------------------------------------------------------
# The controls of the evidence study, the study itself and the benchmark, at their quick sizes
# -------------------------------------------------------------------------------------------------

def test_annotator_relabel_orders_each_pair_by_the_hidden_annotator():
    pairs = plumbing.read_seed_pairs(HERE / "seed_pairs.json")[:6]
    swapped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i % 2 else p
               for i, p in enumerate(pairs)]
    assert tiny_world.annotator_agrees(swapped).tolist() == [True, False] * 3
    assert tiny_world.annotator_relabel(swapped) == pairs
    judged = [{**p, "reward_chosen": 2.0, "reward_rejected": 1.0, "confidence": 0.73} for p in swapped]
    relabelled = tiny_world.annotator_relabel(judged)
    assert [p["chosen"] for p in relabelled] == [p["chosen"] for p in pairs]
    assert relabelled[1]["reward_chosen"] == 1.0 and relabelled[1]["reward_rejected"] == 2.0
    assert relabelled[1]["confidence"] == pytest.approx(0.27) and relabelled[0] == judged[0]


def test_oracle_labels_need_the_tiny_world(tmp_path, tiny_base, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_base, model)
    code = sail.main(["--model", str(model), "--oracle-labels", "--out", str(tmp_path / "o")])
    assert code == 2 and "--oracle-labels needs the tiny world" in capsys.readouterr().err


def test_evidence_study_quick_size_writes_its_tables_and_plot(tmp_path, tiny_base):
    import evidence
    out = tmp_path / "evidence"
    code = evidence.main(["--quick", "--seeds", "2", "--out", str(out), "--conditions",
                          "sail,iterative-seed-dpo,all-labels-dpo"])
    assert code == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["kind", "name", "annotator", "annotator std"]
    assert [r["name"] for r in rows if r["kind"] == "condition"] == [
        "base", "sail", "iterative-seed-dpo", "all-labels-dpo"]
    claims = [r for r in rows if r["kind"].startswith("claim:")]
    assert [r["kind"] for r in claims] == ["claim:base", "claim:iterative-seed-dpo",
                                           "claim:all-labels-dpo"]
    assert all(r["verdict"] in ("held", "did not hold", "inside the noise") for r in claims)
    assert claims[-1]["name"].startswith("all-labels DPO beats SAIL")
    assert "| condition | annotator | seen | unseen | fidelity | self-label acc |" in (
        out / "results.md").read_text()
    assert (out / "trajectory.png").exists() == HAS_MATPLOTLIB  # the plot needs matplotlib
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"{c}-seed{s}" for c in ("all-labels-dpo", "iterative-seed-dpo", "sail")
                    for s in (0, 1)]


def test_evidence_verdict_rule():
    import evidence
    assert evidence.verdict([3.0, 2.5, 3.5]) == "held"
    assert evidence.verdict([-3.0, -2.5, -3.5]) == "did not hold"
    assert evidence.verdict([3.0, -2.5, 0.5]) == "inside the noise"
    assert evidence.verdict([-3.0, -2.5, -3.5], expected=-1) == "held"  # a claim that SAIL loses
    assert evidence.verdict([3.0, 2.5, 3.5], expected=0) == "no claim; SAIL higher"
    assert evidence.verdict([3.0]) == "one seed: no verdict"


@pytest.mark.parametrize("argv, message", [
    (["--conditions", "sail,magic"], "unknown condition(s) magic"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_evidence_bad_input(tmp_path, capsys, argv, message):
    import evidence
    code = evidence.main([*argv, "--out", str(tmp_path / "e")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evidence_refuses_an_existing_output_folder(earlier_run, capsys):
    import evidence
    assert evidence.main(["--out", str(earlier_run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


def test_benchmark_quick_size_writes_its_tables_and_plot(tmp_path, tiny_base):
    import bench
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["measure", "setting", "value", "seconds", "per_second", "unit",
                             "peak_mb"]
    measures = {r["measure"] for r in rows}
    assert {"stage: generation", "stage: ranking", "stage: DPO", "reward: batched", "reward: loop",
            "dpo: concatenated", "dpo: separate"} <= measures
    assert all(float(r["seconds"]) > 0 for r in rows)
    text = (out / "results.md").read_text()
    assert "Batched implicit reward vs loop" in text and "concatenated vs separate" in text
    assert (out / "scaling.png").exists() == HAS_MATPLOTLIB


# -------------------------------------------------------------------------------------------------
# A long job: resume, faults, several processes, memory options
# -------------------------------------------------------------------------------------------------

# 2 prompts per generation call (2 rounds), a checkpoint every 2 of 6 DPO steps
RESUMABLE = ["--tiny", "--iters", "1", "--dpo-steps", "6",
             "--checkpoint-every", "2", "--n-candidates", "3", "--k-draws", "2",
             "--prompts-per-iter", "4", "--generation-batch", "6", "--eval-seeds", "1",
             "--effective-batch", "8", "--micro-batch", "8"]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert sail.main([*RESUMABLE, "--out", str(out)]) == 0
    return out


def records(run):
    """metrics.jsonl without the wall-clock seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_unet(run):
    return UNet2DConditionModel.from_pretrained(run / "iter_1" / "unet").state_dict()


def assert_same_run(expected, run):
    assert records(run) == records(expected)
    assert (run / "iter_1" / "pairs.json").read_text() == (expected / "iter_1" / "pairs.json").read_text()
    for theirs in (expected / "iter_1" / "pairs").glob("*.pt"):  # the judged latents, bit for bit
        assert torch.equal(torch.load(theirs), torch.load(run / "iter_1" / "pairs" / theirs.name))
    theirs, ours = final_unet(expected), final_unet(run)
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)


def test_a_finished_stage_deletes_its_checkpoints(uninterrupted):
    assert list((uninterrupted / "checkpoints").iterdir()) == []  # each stage's UNet is saved


class Crash(Exception):
    """Stands for a kill: the run stops wherever it is, saving nothing more."""


def count_calls(monkeypatch, name, crash_at=None):
    calls, real = [], getattr(sail, name)

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise Crash
        return real(*args, **kwargs)
    monkeypatch.setattr(sail, name, counted)
    return calls


@pytest.mark.parametrize("name, crash_at, redone", [
    ("judge_candidates", 2, 1),  # mid-generation: the second round of prompts; 1 round to redo
    ("dpo_loss", 10, 4),         # mid-training: iter_1 step 4 of 6 (iter_0 took 6); from step 2
])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, uninterrupted,
                                                           name, crash_at, redone):
    out = tmp_path / "run"
    count_calls(monkeypatch, name, crash_at)
    with pytest.raises(Crash):  # the seed pairs given relative to the working folder
        sail.main([*RESUMABLE, "--out", str(out), "--keep-checkpoints", "1",
                   "--seed-pairs", "seed_pairs.json"])
    if name == "dpo_loss":  # iter_0 finished (its checkpoints are gone); iter_1 keeps the newest
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_1-step000002.pt"]
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"  # config.json holds absolute paths: resume from anywhere
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    calls = count_calls(monkeypatch, name)
    assert sail.main(["--resume", str(out), "--seed-pairs", str(HERE / "seed_pairs.json")]) == 0
    assert len(calls) == redone  # it continued where it stopped, it did not start over
    assert json.loads((out / "config.json").read_text())["seed_pairs"] == str(HERE / "seed_pairs.json")
    assert_same_run(uninterrupted, out)


def start_run(*flags):
    return subprocess.Popen([sys.executable, "sail.py", *flags], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ)


def wait_for(ready, process, timeout=120):
    for _ in range(timeout * 100):
        if ready():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_ctrl_c_then_a_kill_while_resuming_leave_a_run_that_resumes_to_the_same_result(
        tmp_path, uninterrupted):
    """Ctrl-C (SIGINT) after the first DPO step: a checkpoint is saved and the run exits 130.
    Its resume is killed (SIGKILL: no handler runs) once it has saved a newer checkpoint. What is
    on disk then resumes to the uninterrupted result."""
    out = tmp_path / "run"
    process = start_run(*RESUMABLE, "--out", str(out))
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"step"' in metrics.read_text(), process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert f"continue with: python sail.py --resume {out}" in stderr
    saved = sorted((out / "checkpoints").glob("iter_*-step*.pt"))
    assert saved  # saved where it stopped
    resumed = start_run("--resume", str(out))
    wait_for(lambda: sorted((out / "checkpoints").glob("iter_*-step*.pt"))[-1:] != saved[-1:],
             resumed)
    resumed.kill()
    resumed.communicate(timeout=60)
    assert sail.main(["--resume", str(out)]) == 0
    assert_same_run(uninterrupted, out)


def test_state_files_are_written_whole_or_not_at_all(tmp_path):
    run = sail.Run(tmp_path, sail.Args(iters=0))
    path = tmp_path / "state.json"
    run.write_json(path, {"good": 1})

    def dies_half_way(temporary):
        temporary.write_text('{"goo')
        raise Crash
    with pytest.raises(Crash):
        run.write(path, dies_half_way)
    assert json.loads(path.read_text()) == {"good": 1}


def test_nan_loss_exits_3_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys, tiny_base):
    out, real, calls = tmp_path / "run", sail.dpo_loss, []

    def poisoned(*args):
        calls.append(1)
        loss, inside = real(*args)
        return (loss * math.nan if len(calls) == 5 else loss), inside
    monkeypatch.setattr(sail, "dpo_loss", poisoned)
    assert sail.main([*RESUMABLE, "--out", str(out)]) == 3
    error = capsys.readouterr().err
    assert "iter_0: step 5: the DPO loss is nan" in error and "iter_0-step000004.pt" in error
    kept = torch.load(out / "checkpoints" / "iter_0-step000004.pt", weights_only=True)
    assert kept["step"] == 4 and all(v.isfinite().all() for v in kept["unet"].values())
    assert not (out / "iter_0" / "summary.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "1e-4"], "--lr 0.0001 (the run has 3e-05)"),
    (["--out", "elsewhere"], "--out elsewhere"),
])
def test_resume_refuses_other_settings_and_changes_nothing(tmp_path, uninterrupted, capsys, flags,
                                                           message):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert sail.main(["--resume", str(run), *flags]) == 2
    assert message in capsys.readouterr().err
    assert before == {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert sail.main(["--resume", str(tmp_path)]) == 2
    assert "not a sail.py run folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_resuming_a_finished_run_redoes_nothing(tmp_path, uninterrupted, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    calls = count_calls(monkeypatch, "diffusion_dpo") + count_calls(monkeypatch, "judge_candidates")
    assert sail.main(["--resume", str(run)]) == 0
    assert calls == [] and records(run) == records(uninterrupted)


def test_an_output_folder_that_cannot_be_created_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert sail.main([*RESUMABLE, "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "is not a writable folder" in capsys.readouterr().err


def test_a_disk_too_small_for_the_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                                 tiny_base):
    monkeypatch.setattr(plumbing.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    out = tmp_path / "run"
    assert sail.main([*RESUMABLE, "--out", str(out)]) == 2
    assert "GB are free" in capsys.readouterr().err and not out.exists()


def torchrun(*flags):
    """sail.py in 2 processes on the CPU (gloo), as `torchrun --nproc_per_node=2 sail.py` does."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "sail.py", *flags],
                            cwd=HERE, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_up_to_rounding(expected, out):
    ours, theirs = records(out), records(expected)
    assert [(r["stage"], r.get("step")) for r in ours] == [(r["stage"], r.get("step")) for r in theirs]
    # every DPO step's loss (stage summaries carry the stage mean): the same up to rounding
    assert [r["loss"] for r in ours if "loss" in r] == pytest.approx(
        [r["loss"] for r in theirs if "loss" in r], rel=1e-3)
    pairs = [json.loads((run / "iter_1" / "pairs.json").read_text()) for run in (out, expected)]
    assert [p["prompt"] for p in pairs[0]] == [p["prompt"] for p in pairs[1]]
    # the two runs differ by float rounding only: far less than what training changed
    base = UNet2DConditionModel.from_pretrained(expected / "tiny_base" / "unet").state_dict()
    one, two = final_unet(expected), final_unet(out)
    trained = max((one[k] - base[k]).abs().max() for k in one)
    assert max((one[k] - two[k]).abs().max() for k in one) < 0.1 * trained


def test_a_one_process_run_resumed_in_two_processes_computes_what_one_does(tmp_path, monkeypatch,
                                                                          uninterrupted):
    """Crashed at iter_0's second DPO step, the run is finished by 2 processes: each takes half of
    every round of prompts and of every batch, DDP averages; the result is one process's."""
    out = tmp_path / "run"
    count_calls(monkeypatch, "dpo_loss", crash_at=2)
    with pytest.raises(Crash):
        sail.main([*RESUMABLE, "--out", str(out)])
    torchrun("--resume", str(out))
    assert_same_up_to_rounding(uninterrupted, out)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, uninterrupted):
    out = tmp_path / "run"
    assert sail.main([*RESUMABLE, "--iters", "0", "--out", str(out), "--gradient-checkpointing"]) == 0
    step0 = [r.get("loss") for r in records(uninterrupted) if r["stage"] in ("base", "iter_0")]
    assert [r.get("loss") for r in records(out)] == step0


def test_bf16_keeps_frozen_models_in_bf16_and_trains_the_unet_in_fp32(tmp_path, tiny_base,
                                                                       monkeypatch):
    seen = {}
    real = sail.diffusion_dpo

    def spy(pipe, ref_unet, *args):
        seen.update(ref=ref_unet.dtype, vae=pipe.vae.dtype, text=pipe.text_encoder.dtype,
                    theta=pipe.unet.dtype)
        return real(pipe, ref_unet, *args)
    monkeypatch.setattr(sail, "diffusion_dpo", spy)
    monkeypatch.setattr(sail, "evaluate", lambda *_: {})  # sampling 72 images in bf16: 2 min on a CPU
    out = tmp_path / "run"
    assert sail.main([*RESUMABLE, "--iters", "0", "--heldout-pairs", "none", "--effective-batch", "4",
                      "--micro-batch", "4", "--out", str(out), "--precision", "bf16"]) == 0
    assert seen == dict(ref=torch.bfloat16, vae=torch.bfloat16, text=torch.bfloat16,
                        theta=torch.float32)
    assert all(math.isfinite(r["loss"]) for r in records(out) if "loss" in r)


def test_fp16_redoes_overflowing_steps_counts_them_and_carries_the_scale(tmp_path, tiny_base,
                                                                          monkeypatch):
    monkeypatch.setattr(sail, "evaluate", lambda *_: {})  # sampling in fp16: a minute on a CPU
    out = tmp_path / "run"
    assert sail.main(["--tiny", "--iters", "1", *QUICK, "--prompts-per-iter", "2", "--sample-steps", "2",
                      "--effective-batch", "4", "--micro-batch", "4", "--heldout-pairs", "none",
                      "--precision", "fp16", "--out", str(out)]) == 0
    steps = [r for r in records(out) if "step" in r]
    summaries = {r["stage"]: r for r in records(out) if r.get("event") == "summary"}
    assert all(math.isfinite(r["loss"]) for r in steps)
    # theta == ref up to fp16 rounding, which beta/2 = 2500 magnifies (shipped base: 0.668)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    first = [r for r in steps if r["stage"] == "iter_0"]
    assert first[0]["overflows"] > 0  # 2**16 overflowed: the step was redone, not skipped
    assert summaries["iter_0"]["overflows"] == sum(r["overflows"] for r in first)
    assert [r["overflows"] for r in steps if r["stage"] == "iter_1"][0] == 0  # scale carried over
    trained = UNet2DConditionModel.from_pretrained(out / "iter_0" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(out / "tiny_base" / "unet").state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # 3 steps, 3 updates


def test_fp16_keeps_a_vae_that_asks_for_it_in_fp32(pipe):
    pipe = copy.deepcopy(pipe)
    sail.cast_frozen_models(pipe, "fp16")
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float16 and pipe.unet.dtype == torch.float32


def test_help_shows_dashed_flags_switches_groups_and_the_defaults_of_the_world_that_would_run(
        capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no GPU: the tiny world
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    usage = out[:out.index("\n\n")]
    assert "--seed-pairs" in usage and "--seed_pairs" not in out
    assert "[--tiny]" in usage and "TINY" not in usage  # a switch, not --tiny [TINY]
    assert "Defaults shown: the tiny world" in " ".join(out.split())
    text = " ".join(out.split())
    assert "image size in pixels (SD 1.5: 512) (default: 16)" in text  # the tiny preset's value
    sections = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert sections[-len(sail.GROUPS):] == [f"{title}:" for title in sail.GROUPS.values()]  # grouped as Args is


def test_sail_py_keeps_its_layout_budget():
    """sail.py's header states it: at most 1,000 lines, the algorithm (PART 1, up to the end of
    the SAIL loop) in the first half, no function over 60 lines (issue 13)."""
    source = (HERE / "sail.py").read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert len(lines) <= 1000
    assert functions["sail"].end_lineno <= len(lines) / 2
    assert lines.index(next(line for line in lines if "PART 2: PLUMBING" in line)) > functions["sail"].end_lineno
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1}" for file in ("sail.py", "plumbing.py",
            "tiny_world.py") for node in ast.walk(ast.parse((HERE / file).read_text()))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_tiny_world_never_imports_sail():
    tree = ast.parse((HERE / "tiny_world.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" in imported and not imported & {"sail", "plumbing"}


def test_help_lists_every_setting_with_its_paper_value(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, paper in (("--n-candidates", "(paper: 8)"), ("--k-draws", "(paper: 10)"),
                        ("--beta", "(paper: 5000)"), ("--mix-alpha", "(paper: 0.25; 1 = no mixup)"),
                        ("--effective-batch", "(paper: 128)")):
        assert flag in text and paper in text


# -------------------------------------------------------------------------------------------------
# Real data: the Pick-a-Pic v2 importer, on a small parquet written here with the real columns
# -------------------------------------------------------------------------------------------------

def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pickapic_shard(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({name: [row[i] for row in rows] for i, name in enumerate(
        ["caption", "jpg_0", "jpg_1", "label_0", "label_1"])}), path)


def pickapic_rows(n):
    """Row i: label_0 wins on even i, label_1 on odd i, and every 5th row is a tie."""
    rows = []
    for i in range(n):
        labels = (0.5, 0.5) if i % 5 == 4 else (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)
        rows.append((f"prompt {i}", png_bytes((i, 0, 0)), png_bytes((0, i, 0)), *labels))
    return rows


def test_pickapic_import_drops_ties_and_orders_winners(tmp_path):
    import pickapic
    write_pickapic_shard(tmp_path / "train-0.parquet", pickapic_rows(20))
    out = tmp_path / "data"
    assert pickapic.main([str(tmp_path / "train-0.parquet"), "--out", str(out)]) == 0
    pairs = plumbing.read_seed_pairs(out / "seed_pairs.json")  # the format sail.py reads
    assert len(pairs) == 16  # 20 rows, 4 ties
    for pair in pairs:
        i = int(pair["prompt"].split()[1])
        assert i % 5 != 4
        chosen = Image.open(pair["chosen"]).getpixel((0, 0))
        assert chosen == ((i, 0, 0) if i % 2 == 0 else (0, i, 0))  # jpg_0 wins on even rows


def test_pickapic_subset_is_seeded_and_sized(tmp_path):
    import pickapic
    shard = tmp_path / "train-0.parquet"
    write_pickapic_shard(shard, pickapic_rows(200))  # 160 non-tied pairs
    runs = {}
    for name, flags in (("a", ["--fraction", "0.25"]), ("b", ["--fraction", "0.25"]),
                        ("c", ["--fraction", "0.25", "--seed", "1"]), ("n", ["--n-pairs", "30"])):
        assert pickapic.main([str(shard), "--out", str(tmp_path / name), *flags]) == 0
        runs[name] = [p["prompt"] for p in json.loads((tmp_path / name / "seed_pairs.json").read_text())]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]  # fixed by the seed
    assert 25 <= len(runs["a"]) <= 55  # about 0.25 x 160 (binomial)
    assert 15 <= len(runs["n"]) <= 30  # about 30, never more


def test_pickapic_skips_corrupt_images_and_resumes(tmp_path, capsys):
    import pickapic
    rows = pickapic_rows(6)
    rows[1] = (rows[1][0], b"not an image", *rows[1][2:])
    shard = tmp_path / "train-0.parquet"
    write_pickapic_shard(shard, rows)
    out = tmp_path / "data"
    assert pickapic.main([str(shard), "--out", str(out)]) == 0
    assert "corrupt images skipped 1" in capsys.readouterr().out
    written = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert len(written) == 8  # 6 rows - 1 tie - 1 corrupt = 4 pairs, 2 images each
    assert pickapic.main([str(shard), "--out", str(out)]) == 0  # the same command again resumes
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == written


def test_pickapic_refuses_a_parquet_without_its_columns(tmp_path, capsys):
    import pickapic
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""]}), tmp_path / "other.parquet")
    code = pickapic.main([str(tmp_path / "other.parquet"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "other.parquet: missing Pick-a-Pic column(s) jpg_1, label_0, label_1" in err
    assert not (tmp_path / "o").exists()


def test_pickapic_reads_a_datasets_dataset_like_its_parquet_shards(tmp_path):
    import pickapic
    datasets = pytest.importorskip("datasets")
    rows = pickapic_rows(20)
    write_pickapic_shard(tmp_path / "train-0.parquet", rows)
    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {name: [row[i] for row in rows] for i, name in enumerate(columns)})}
    ).save_to_disk(tmp_path / "pickapic_v2")
    imported = {}
    for name, source in (("parquet", [str(tmp_path / "train-0.parquet")]),
                         ("dataset", ["--dataset", str(tmp_path / "pickapic_v2")])):
        assert pickapic.main([*source, "--out", str(tmp_path / name)]) == 0
        imported[name] = [(p["prompt"], Path(p["chosen"]).read_bytes(),
                           Path(p["rejected"]).read_bytes())
                          for p in plumbing.read_seed_pairs(tmp_path / name / "seed_pairs.json")]
    assert len(imported["dataset"]) == 16 and imported["dataset"] == imported["parquet"]


@pytest.mark.parametrize("argv, message", [
    ([], "give parquet shards or --dataset"),
    (["--dataset", "/no/such/dataset"], "--dataset /no/such/dataset: cannot load"),
])
def test_pickapic_bad_sources(tmp_path, capsys, argv, message):
    import pickapic
    pytest.importorskip("datasets")
    assert pickapic.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------------
# Evaluation: the hidden annotator in the tiny world, PickScore on a tiny CLIP saved to a folder
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_pickscore(tmp_path_factory):
    """A CLIPModel + processor built from configs and saved: the loading code of PickScore_v1."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    folder = tmp_path_factory.mktemp("pickscore")
    tokenizer = tiny_world.tokenizer(folder)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=8,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=16, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0)).save_pretrained(folder / "model")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                     crop_size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(folder / "processor")
    return folder


def test_pickscore_is_scaled_cosine_of_clip_embeddings(tiny_pickscore):
    import evaluate
    scorer = evaluate.PickScore(tiny_pickscore / "model", tiny_pickscore / "processor",
                                torch.device("cpu"))
    images = tiny_world.draw_images(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    scores = scorer(images, prompts)
    # independent: CLIPModel's own forward gives logits_per_image = logit_scale.exp() * cos
    inputs = scorer.processor(text=prompts, images=[plumbing.to_pil(i) for i in images],
                              padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**inputs).logits_per_image                      # (images, texts)
    torch.testing.assert_close(scores, logits.diagonal())
    assert scorer.model.logit_scale.exp().item() == pytest.approx(math.exp(3.0))


@pytest.fixture(scope="session")
def tiny_aesthetic(tiny_pickscore, tmp_path_factory):
    """A CLIP folder (model + processor, as openai/clip-vit-large-patch14 ships) and a random
    aesthetic head saved under improved-aesthetic-predictor's key names."""
    folder = tmp_path_factory.mktemp("aesthetic")
    shutil.copytree(tiny_pickscore / "model", folder / "clip")
    for file in (tiny_pickscore / "processor").iterdir():
        shutil.copy(file, folder / "clip")
    torch.manual_seed(1)
    sizes = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        head[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(n_out)
    torch.save(head, folder / "head.pth")
    return folder


def test_aesthetic_score_is_the_linear_mlp_of_the_normalised_image_embedding(tiny_aesthetic):
    import evaluate
    scorer = evaluate.Aesthetic(tiny_aesthetic / "clip", tiny_aesthetic / "head.pth",
                                torch.device("cpu"))
    images = tiny_world.draw_images(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    scores = scorer(images, ["a red circle", "a blue square"])
    # independent: CLIP's vision tower + projection by hand, then the head's five affine maps
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images], return_tensors="pt")
    with torch.no_grad():
        pooled = scorer.model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        x = scorer.model.visual_projection(pooled)                               # (2, 16)
    x = x / x.norm(dim=-1, keepdim=True)
    head = torch.load(tiny_aesthetic / "head.pth", weights_only=True)
    for index in (0, 2, 4, 6, 7):
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1))


def test_evaluate_scores_every_stage_of_a_run(uninterrupted, tiny_pickscore, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    code = evaluate.main([str(uninterrupted), "--seeds", "2", "--metrics", "annotator,pickscore",
                          "--pickscore-model", str(tiny_pickscore / "model"),
                          "--pickscore-processor", str(tiny_pickscore / "processor"),
                          "--out", str(out)])
    assert code == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["base", "iter_0", "iter_1"]
    assert {"annotator", "annotator low", "annotator/seen", "annotator/unseen", "fidelity",
            "pickscore", "pickscore high", "pickscore win"} <= set(rows[0])
    assert all(r["prompts"] == "18" and r["images"] == "36" for r in rows)
    assert "| model | annotator | annotator win vs base |" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "clipscore"], "unknown metric(s) clipscore"),
    (["--models", "iter_9"], "iter_9 not in"),
    (["--metrics", "pickscore", "--pickscore-model", "/no/such/model"], "cannot load the PickScore"),
    (["--metrics", "aesthetic"], "--metrics aesthetic needs --aesthetic-head"),
    (["--metrics", "aesthetic", "--aesthetic-head", "/no/such.pth"], "cannot load the aesthetic"),
])
def test_evaluate_bad_input(uninterrupted, capsys, tmp_path, argv, message):
    import evaluate
    code = evaluate.main([str(uninterrupted), *argv, "--out", str(tmp_path / "e")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    import evaluate
    assert evaluate.main([str(tmp_path)]) == 2
    assert "not a sail.py run folder" in capsys.readouterr().err


# Bootstrap intervals over prompts and win rates against the base, by hand

def test_bootstrap_interval_of_two_prompts_is_their_range_and_holds_the_mean():
    import evaluate
    # 2 prompts scoring 0 and 1: a resample's mean is 0, 0.5 or 1 with odds 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of 1000 resampled means are 0 and 1
    assert evaluate.mean_and_interval(torch.tensor([0.0, 1.0])) == (0.5, 0.0, 1.0)
    assert evaluate.mean_and_interval(torch.full((7,), 3.0)) == (3.0, 3.0, 3.0)


def test_bootstrap_interval_matches_the_normal_approximation_and_shrinks_with_more_prompts():
    import evaluate
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 2 + 5
    widths = []
    for n in (50, 2000):
        mean, low, high = evaluate.mean_and_interval(values[:n])
        assert low < mean < high and mean == pytest.approx(values[:n].double().mean().item())
        # independent: mean +- 1.96 s / sqrt(n) for a mean of n draws
        half = 1.96 * values[:n].double().std().item() / math.sqrt(n)
        assert (high - low) / 2 == pytest.approx(half, rel=0.15)
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # sqrt(2000 / 50) = 6.3 times narrower in theory


def test_win_rate_counts_ties_half_and_a_model_against_itself_wins_half():
    import evaluate
    model = torch.tensor([[1.0, 2.0], [3.0, 3.0]])  # (prompts, seeds)
    base = torch.tensor([[0.0, 2.0], [4.0, 1.0]])
    # prompt 0: a win and a tie -> 0.75; prompt 1: a loss and a win -> 0.5
    assert evaluate.wins(model, base).tolist() == [0.75, 0.5]
    assert evaluate.wins(base, model).tolist() == [0.25, 0.5]
    assert evaluate.wins(model, model).tolist() == [0.5, 0.5]


def test_evaluate_tables_give_intervals_and_win_rates_against_the_base(uninterrupted, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    assert evaluate.main([str(uninterrupted), "--seeds", "2", "--models", "iter_1",
                          "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["base", "iter_1"]  # the base is always scored
    for row in rows:
        for name in ("annotator", "annotator/seen", "annotator/unseen", "fidelity"):
            low, mean, high = (float(row[name + k]) for k in (" low", "", " high"))
            assert low <= mean <= high
            win = [float(row[name + " win" + k]) for k in (" low", "", " high")]
            assert 0 <= win[0] <= win[1] <= win[2] <= 1
    assert all(rows[0][f"annotator win{k}"] == "0.5" for k in ("", " low", " high"))
    # the stages differ, so iter_1 wins or loses some of its images against the base
    assert float(rows[1]["annotator win"]) != 0.5 and rows[1]["annotator"] != rows[0]["annotator"]
    table = (out / "results.md").read_text()
    assert "| model | annotator | annotator win vs base |" in table and "0.5 (itself)" in table


# Prompt sets: any prompt file, or Pick-a-Pic v2 captions through pickapic.py's reader

def test_evaluate_reads_pickapic_captions_as_prompts_unique_and_in_order(uninterrupted, tmp_path):
    import evaluate
    captions = ["a red circle", "a  blue square", "a red circle", "a green triangle"]
    write_pickapic_shard(tmp_path / "test_unique-0.parquet", [
        (caption, png_bytes((i, 0, 0)), png_bytes((0, i, 0)), 1.0, 0.0)
        for i, caption in enumerate(captions)])
    assert evaluate.pickapic_captions([tmp_path / "test_unique-0.parquet"], "test_unique") == [
        "a red circle", "a blue square", "a green triangle"]
    out = tmp_path / "eval"
    assert evaluate.main([str(uninterrupted), "--seeds", "1", "--models", "base", "--pickapic",
                          str(tmp_path / "test_unique-0.parquet"), "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        assert next(csv.DictReader(handle))["prompts"] == "3"


# ImageReward on a tiny BLIP, HPS on a tiny open_clip ViT, both saved in their official layouts
# and checked against a forward pass written out here from those layouts

def attend(q, k, v, heads, keep=None):
    """Multi-head scaled dot-product attention of projected (B, L, D) queries, keys, values."""
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, h, L, d)
    logits = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    out = logits.softmax(-1) @ split(v)                                        # (B, h, L, d)
    return out.transpose(1, 2).reshape(q.shape)


def layers(weights):
    linear = lambda x, name: x @ weights[name + ".weight"].T + weights[name + ".bias"]
    norm = lambda x, name, eps: torch.nn.functional.layer_norm(
        x, x.shape[-1:], weights[name + ".weight"], weights[name + ".bias"], eps)
    return linear, norm


def random_weights(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * (0.3 if len(shape) > 1 else 0.1)
            for name, shape in shapes.items()}


def mlp_head_shapes(prefix, size):
    sizes = [(size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    return {f"{prefix}{index}.{kind}": (n_out, n_in) if kind == "weight" else (n_out,)
            for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes) for kind in ("weight", "bias")}


IR_VISION, IR_TEXT, IR_DEPTH = 64, 32, 2  # BLIP's ViT: heads = width / 64; its BERT: 4 heads


@pytest.fixture(scope="session")
def tiny_imagereward(tmp_path_factory):
    """ImageReward.pt under BLIP's names (vit.py, med.py) and ImageReward's MLP, random; its
    med_config.json; a word-level bert tokenizer folder."""
    folder = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", *tiny_world.COLOURS, *tiny_world.SHAPES]
    (folder / "tokenizer").mkdir()  # the files of bert-base-uncased's tokenizer, our words
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    D, H, v = IR_VISION, IR_TEXT, "blip.visual_encoder."
    shapes = {v + "cls_token": (1, 1, D), v + "pos_embed": (1, 5, D),  # 16 px / patch 8: 4 + 1
              v + "patch_embed.proj.weight": (D, 3, 8, 8), v + "patch_embed.proj.bias": (D,),
              v + "norm.weight": (D,), v + "norm.bias": (D,)}
    for i in range(IR_DEPTH):
        for name, (n_out, n_in) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D),
                                    "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
            shapes[f"{v}blocks.{i}.{name}.weight"], shapes[f"{v}blocks.{i}.{name}.bias"] = (n_out, n_in), (n_out,)
        for name in ("norm1", "norm2"):
            shapes[f"{v}blocks.{i}.{name}.weight"] = shapes[f"{v}blocks.{i}.{name}.bias"] = (D,)
    t = "blip.text_encoder."
    shapes.update({t + "embeddings.word_embeddings.weight": (len(words), H),
                   t + "embeddings.position_embeddings.weight": (40, H),
                   t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,)})
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for name, (n_out, n_in) in {
                "attention.self.query": (H, H), "attention.self.key": (H, H),
                "attention.self.value": (H, H), "attention.output.dense": (H, H),
                "crossattention.self.query": (H, H), "crossattention.self.key": (H, D),
                "crossattention.self.value": (H, D), "crossattention.output.dense": (H, H),
                "intermediate.dense": (2 * H, H), "output.dense": (H, 2 * H)}.items():
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (n_out, n_in), (n_out,)
        for name in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (H,)
    shapes.update({"blip.vision_proj.weight": (16, D), **mlp_head_shapes("mlp.layers.", H)})
    weights = random_weights(shapes, seed=2)
    weights[t + "embeddings.position_ids"] = torch.arange(40)[None]  # med.py's buffer
    torch.save(weights, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({  # med_config.json's keys, tiny sizes
        "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": H,
        "intermediate_size": 2 * H, "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
        "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2,
        "vocab_size": len(words), "encoder_width": D, "add_cross_attention": True}))
    return folder


def imagereward_by_hand(weights, pixels, ids, mask):
    """ImageReward.score written out from the official layout: BLIP's ViT (vit.py), BERT with
    cross-attention in encoder mode (med.py), the MLP, (r - mean) / std (ImageReward.py)."""
    linear, norm = layers(weights)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = torch.nn.functional.conv2d(pixels, weights[v + "patch_embed.proj.weight"],
                                   weights[v + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([weights[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + weights[v + "pos_embed"]                                             # (B, 5, D)
    for i in range(IR_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = linear(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + linear(attend(q, k, val, IR_VISION // 64), b + "attn.proj")
        x = x + linear(torch.nn.functional.gelu(linear(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")),
                       b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)
    h = weights[t + "embeddings.word_embeddings.weight"][ids] + \
        weights[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = norm(h, t + "embeddings.LayerNorm", 1e-12)
    keep = mask.bool()[:, None, None, :]                                   # padding keys off
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        a = attend(linear(h, p + "attention.self.query"), linear(h, p + "attention.self.key"),
                   linear(h, p + "attention.self.value"), 4, keep)
        h = norm(linear(a, p + "attention.output.dense") + h, p + "attention.output.LayerNorm", 1e-12)
        c = attend(linear(h, p + "crossattention.self.query"), linear(image, p + "crossattention.self.key"),
                   linear(image, p + "crossattention.self.value"), 4)
        h = norm(linear(c, p + "crossattention.output.dense") + h, p + "crossattention.output.LayerNorm", 1e-12)
        f = linear(torch.nn.functional.gelu(linear(h, p + "intermediate.dense")), p + "output.dense")
        h = norm(f + h, p + "output.LayerNorm", 1e-12)
    r = h[:, 0]                                                                   # [CLS]
    for index in (0, 2, 4, 6, 7):
        r = linear(r, f"mlp.layers.{index}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)  # ImageReward.__init__


def test_imagereward_is_its_mlp_on_blips_cls_feature_standardised(tiny_imagereward):
    import evaluate
    scorer = evaluate.ImageReward(tiny_imagereward / "ImageReward.pt",
                                  tiny_imagereward / "med_config.json",
                                  tiny_imagereward / "tokenizer", torch.device("cpu"))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    scores = scorer(images, prompts)
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images],
                              return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 16, 16)  # the image size read from the checkpoint
    text = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                            return_tensors="pt")
    assert text.input_ids[0, :5].tolist() == [2, 5, *(scorer.tokenizer.convert_tokens_to_ids(
        ["red", "circle"])), 3]  # [CLS] a red circle [SEP]
    weights = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    expected = imagereward_by_hand(weights, pixels, text.input_ids, text.attention_mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.01  # the prompts and images matter


HPS_WIDTH, HPS_HEADS = 32, 4


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory, tiny_pickscore):
    """An HPS checkpoint ({"state_dict": open_clip's names}, random) and a CLIP config +
    processor folder of the same tiny shape with gelu, as open_clip's ViT-H-14 (--hps-clip)."""
    from transformers import CLIPConfig
    folder = tmp_path_factory.mktemp("hps")
    config = CLIPConfig.from_pretrained(tiny_pickscore / "model")
    config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"
    config.save_pretrained(folder / "clip")
    for file in (tiny_pickscore / "processor").iterdir():
        shutil.copy(file, folder / "clip")
    W, E, vocab = HPS_WIDTH, 16, config.text_config.vocab_size
    shapes = {"visual.conv1.weight": (W, 3, 8, 8), "visual.class_embedding": (W,),
              "visual.positional_embedding": (5, W), "visual.proj": (W, E),
              "token_embedding.weight": (vocab, W), "positional_embedding": (8, W),
              "text_projection": (W, E)}
    for name in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (W,)
    for tower in ("visual.transformer", "transformer"):
        for i in range(2):
            b = f"{tower}.resblocks.{i}."
            shapes.update({b + "attn.in_proj_weight": (3 * W, W), b + "attn.in_proj_bias": (3 * W,),
                           b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                           b + "mlp.c_fc.weight": (2 * W, W), b + "mlp.c_fc.bias": (2 * W,),
                           b + "mlp.c_proj.weight": (W, 2 * W), b + "mlp.c_proj.bias": (W,)})
            for name in ("ln_1", "ln_2"):
                shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (W,)
    state = random_weights(shapes, seed=3)
    state["logit_scale"] = torch.tensor(4.6)
    state["attn_mask"] = torch.full((8, 8), float("-inf")).triu(1)  # open_clip's buffer
    torch.save({"epoch": 1, "state_dict": state}, folder / "HPS_v2_compressed.pt")
    return folder


def hps_by_hand(weights, pixels, ids, eos):
    """hpsv2's score written out from open_clip's layout: 100 * cos(image, text) of a CLIP ViT
    (conv1, class token, ln_pre, pre-norm blocks, ln_post on the class token, @ proj) and its
    causal text transformer read at the end-of-text token."""
    linear, norm = layers(weights)

    def blocks(x, tower, keep=None):
        for i in range(2):
            b = f"{tower}.resblocks.{i}."
            q, k, v = (norm(x, b + "ln_1", 1e-5) @ weights[b + "attn.in_proj_weight"].T
                       + weights[b + "attn.in_proj_bias"]).chunk(3, -1)
            x = x + linear(attend(q, k, v, HPS_HEADS, keep), b + "attn.out_proj")
            x = x + linear(torch.nn.functional.gelu(linear(norm(x, b + "ln_2", 1e-5), b + "mlp.c_fc")),
                           b + "mlp.c_proj")
        return x

    x = torch.nn.functional.conv2d(pixels, weights["visual.conv1.weight"], stride=8)
    x = torch.cat([weights["visual.class_embedding"].expand(len(x), 1, -1),
                   x.flatten(2).transpose(1, 2)], 1) + weights["visual.positional_embedding"]
    x = blocks(norm(x, "visual.ln_pre", 1e-5), "visual.transformer")
    image = norm(x[:, 0], "visual.ln_post", 1e-5) @ weights["visual.proj"]
    L = ids.shape[1]
    t = weights["token_embedding.weight"][ids] + weights["positional_embedding"][:L]
    t = norm(blocks(t, "transformer", torch.ones(L, L, dtype=torch.bool).tril()), "ln_final", 1e-5)
    # open_clip reads the argmax token, its end-of-text (the largest id); here the first eos
    text = t[torch.arange(len(ids)), (ids == eos).int().argmax(-1)] @ weights["text_projection"]
    return 100 * torch.nn.functional.cosine_similarity(image, text)


def test_hps_is_100_cosine_of_the_hps_weights_in_clip(tiny_hps):
    import evaluate
    scorer = evaluate.HPS(tiny_hps / "HPS_v2_compressed.pt", tiny_hps / "clip", torch.device("cpu"))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    scores = scorer(images, prompts)
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images],
                              return_tensors="pt")["pixel_values"]
    ids = scorer.processor(text=prompts, padding=True, return_tensors="pt").input_ids
    state = torch.load(tiny_hps / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    expected = hps_by_hand(state, pixels, ids, scorer.processor.tokenizer.eos_token_id)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-3)
    assert scores.std() > 0.1


def test_evaluate_scores_imagereward_and_hps_from_local_files(uninterrupted, tiny_imagereward,
                                                              tiny_hps, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    assert evaluate.main([
        str(uninterrupted), "--seeds", "1", "--models", "base,iter_0", "--metrics", "imagereward,hps",
        "--imagereward-model", str(tiny_imagereward / "ImageReward.pt"),
        "--imagereward-config", str(tiny_imagereward / "med_config.json"),
        "--imagereward-tokenizer", str(tiny_imagereward / "tokenizer"),
        "--hps-checkpoint", str(tiny_hps / "HPS_v2_compressed.pt"), "--hps-clip", str(tiny_hps / "clip"),
        "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"imagereward", "imagereward win", "hps", "hps high"} <= set(rows[0])
    assert "annotator" not in rows[0] and rows[0]["imagereward"] != rows[1]["imagereward"]


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "imagereward", "--imagereward-model", "/no/such.pt"],
     "--imagereward-model /no/such.pt: no such file"),
    (["--metrics", "hps", "--hps-checkpoint", "/no/such.pt"], "--hps-checkpoint /no/such.pt: no such file"),
    (["--metrics", "hps"], "--hps-checkpoint not given and xswu/HPSv2/HPS_v2_compressed.pt cannot be "
                           "downloaded"),
    (["--pickapic", "/no/such.parquet"], "/no/such.parquet: cannot read as parquet"),
])
def test_evaluate_names_a_missing_scorer_file(uninterrupted, capsys, tmp_path, monkeypatch, argv, message):
    import evaluate
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here or in CI: the same either way
    code = evaluate.main([str(uninterrupted), *argv, "--out", str(tmp_path / "e")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# -------------------------------------------------------------------------------------------------
# bench.py --gpu-figures (the GPU figures of the README) at toy sizes on the CPU: every code path
# of the GPU run executes here, so a typo cannot waste GPU time
# -------------------------------------------------------------------------------------------------

def figure_rows(out):
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_gpu_figures_toy_writes_every_row_of_every_part(tmp_path):
    import bench
    out = tmp_path / "figures"
    assert bench.main(["--gpu-figures", "--toy", "--out", str(out)]) == 0
    rows = figure_rows(out)
    assert list(rows[0]) == bench.FIGURE_FIELDS
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    # part 1: every stage of a whole sail.py --iters 1, per precision
    for precision in ("fp32", "bf16", "fp16"):
        stages = [r["measure"] for r in rows if r["part"] == "1" and r["precision"] == precision]
        assert {"whole run (sail.main)", "load model", "evaluation (sample, grid)",
                "self-labelling (generate, rank, decode pair)", "generation: candidates",
                "generation: evaluation images", "ranking (Eq. 8)", "DPO iter_0",
                "DPO iter_1"} == set(stages)
        rates = {r["measure"]: float(r["per_second"]) for r in rows
                 if r["part"] == "1" and r["precision"] == precision and r["per_second"]}
        assert set(rates) == {"generation: candidates", "generation: evaluation images",
                              "ranking (Eq. 8)", "DPO iter_0", "DPO iter_1"}
    candidates = [r for r in rows if r["measure"] == "generation: candidates"]
    assert {int(r["units"]) for r in candidates} == {bench.TOY_SIZES["n_candidates"]}
    # a stage's peak memory counts the stages inside it
    for precision in ("fp32", "bf16", "fp16"):
        peak = {r["measure"]: float(r["peak_gib"]) for r in rows
                if r["part"] == "1" and r["precision"] == precision}
        assert peak["whole run (sail.main)"] >= max(peak.values())
    # part 2: official step and sail.py's, same batch
    part2 = [r for r in rows if r["part"] == "2"]
    assert [(r["measure"], r["precision"]) for r in part2] == [
        ("official train.py step", "fp16"), ("sail.diffusion_dpo step", "fp16"),
        ("sail.diffusion_dpo step", "bf16"), ("sail.diffusion_dpo step", "bf16"),
        ("sail.diffusion_dpo step", "bf16")]
    batch = f"{bench.TOY_SIZES['dpo_pairs']} pairs/step"
    assert [r["setting"] for r in part2] == [batch] * 3 + [f"{batch}, 5 steps per call", batch]
    assert int(part2[3]["units"]) == 5 * bench.TOY_SIZES["dpo_pairs"]
    # part 3: one row per judge and move of theta, each with its spread and the real one
    part3 = [r for r in rows if r["part"] == "3"]
    assert [r["measure"] for r in part3] == [
        f"Eq. 8 spread, judge {judge}" for judge in ("fp32", "fp16", "bf16")] * 2
    assert ["at 1 x lr" in r["setting"] for r in part3] == [True] * 3 + [False] * 3
    # the fp32 judge is the truth: no error against itself
    assert float(part3[0]["value"]) == 0 and float(part3[3]["value"]) == 0
    assert all("real spread" in r["note"] and "changed vs fp32" in r["note"] for r in part3)
    # part 4: SDXL with and without gradient checkpointing
    assert len([r for r in rows if r["part"] == "4" and r["per_second"]]) == 2
    text = (out / "results.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "/ official: pairs/s"):
        assert heading in text
    assert "part 4: SDXL-shaped pipeline built" in (out / "log").read_text()


def test_gpu_figures_records_out_of_memory_and_the_time_budget(tmp_path, monkeypatch):
    import bench
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(sail, "diffusion_dpo", out_of_memory)
    out = tmp_path / "oom"
    assert bench.main(["--gpu-figures", "--toy", "--parts", "1,4", "--precisions", "bf16",
                       "--out", str(out)]) == 0
    rows = figure_rows(out)
    assert [r["status"] for r in rows if r["part"] == "4"] == ["OOM", "OOM"]
    # part 1: the stage that ran out is a row, and so is the run it stopped
    part1 = {r["measure"]: r["status"] for r in rows if r["part"] == "1"}
    assert part1["DPO iter_0"] == part1["whole run (sail.main)"] == part1["whole run"] == "OOM"
    monkeypatch.undo()
    out = tmp_path / "budget"
    assert bench.main(["--gpu-figures", "--toy", "--parts", "2,3", "--budget-s", "1",
                       "--out", str(out)]) == 0
    assert [r["status"].split(":")[0] for r in figure_rows(out) if r["part"] in ("2", "3")] == [
        "skipped", "skipped"]


# =================================================================================================
# Wiring: what each step of a whole run is given (issue 18)
# =================================================================================================
# The tests above pin each formula in isolation; these pin how the pieces are wired together. All
# read ONE run with two iterations and --reward-ref prev, so that iteration 2, the 'prev' judge and
# a resume after two finished stages all happen. Spies (wrappers that record their arguments) see
# what each step was given; each test compares that with what SPEC section 1 says it should be.
# A model is identified by what it predicts on one fixed noisy latent (`denoises`).

def test_ranked_mixup_ranks_by_margin_not_by_the_winners_reward():
    pairs = [{"prompt": f"p{i}", "reward_chosen": w, "reward_rejected": l, "confidence": 0.0}
             for i, (w, l) in enumerate([(5.0, 4.9), (1.0, -2.0), (2.0, 0.0), (0.5, 0.4)])]
    mixed = sail.ranked_mixup(pairs, SEEDS, 0.5, random.Random(0), keep_top=0.5)
    # margins 0.1, 3.0, 2.0, 0.1: the top half is p1, p2, though p0 has the highest r_w
    assert [p["prompt"] for p in mixed if "reward_chosen" in p] == ["p1", "p2"]


WIRED = ["--tiny", "--iters", "2", "--reward-ref", "prev", "--dpo-steps", "3", "--n-candidates",
         "3", "--k-draws", "2", "--prompts-per-iter", "4", "--sample-steps", "4", "--eval-seeds", "2"]
WIRED_STAGES = ["base", "iter_0", "iter_1", "iter_2"]


def denoises(unet):
    """What `unet` predicts for one fixed noisy latent and context: equal answers, one model."""
    generator = torch.Generator().manual_seed(123)
    x_t = torch.randn((1, 4, 8, 8), generator=generator)
    context = torch.randn((1, 8, 32), generator=generator)
    with torch.no_grad():
        return unet(x_t.to(unet.device, unet.dtype), torch.tensor([500], device=unet.device),
                    encoder_hidden_states=context.to(unet.device, unet.dtype)).sample.float().cpu()


def same_model(a, b):
    """Two `denoises` answers from one model (a copy differs by float rounding: ~5e-7)."""
    return (a - b).abs().max().item() < 1e-4


def stage_before(stage):
    """The stage whose model `stage` starts from: eps^{i-1} for iter_i, the base for iter_0."""
    return "base" if stage == "iter_0" else f"iter_{int(stage.split('_')[1]) - 1}"


def saved_unet(out, stage):
    return UNet2DConditionModel.from_pretrained(out / "tiny_base" / "unet" if stage == "base"
                                                else out / stage / "unet")


def spy_on_sail(monkeypatch):
    """Wrap sail's steps so that a run records what each was given; returns the records."""
    seen = {"dpo": [], "judge": [], "evaluate": []}
    context = [None]  # the record of the step running now: a DPO stage, a judging call, an evaluation
    real = {name: getattr(sail, name) for name in (
        "diffusion_dpo", "dpo_step_data", "denoising_error", "make_optimizer", "judge_candidates",
        "generate", "implicit_reward", "evaluate")}

    def within(record, call):
        context[0] = record
        try:
            return call()
        finally:
            context[0] = None

    def diffusion_dpo(pipe, ref_unet, pairs, args, stage, run, *scale):
        record = {"stage": stage, "pairs": list(pairs), "theta": denoises(pipe.unet),
                  "ref": denoises(ref_unet), "unet": pipe.unet, "steps": [], "grad_norms": [],
                  "encode": lambda prompts: sail.encode_text(pipe, prompts, args)}
        seen["dpo"].append(record)
        return within(record, lambda: real["diffusion_dpo"](pipe, ref_unet, pairs, args, stage, run,
                                                            *scale))

    def dpo_step_data(*args, **kwargs):
        data = real["dpo_step_data"](*args, **kwargs)
        if context[0] is None or "steps" not in context[0]:
            return data
        unet = context[0]["unet"]
        context[0]["steps"].append({"batch": data[0], "calls": [], "stale_grads": any(
            p.grad is not None and bool(p.grad.any()) for p in unet.parameters())})
        return data

    def denoising_error(unet, scheduler, x0, noise, t, cond):
        if context[0] is not None and "steps" in context[0]:  # a DPO step, not Eq. 8
            context[0]["steps"][-1]["calls"].append({
                "model": "theta" if unet is context[0]["unet"] else "ref", "x0": x0.detach().clone(),
                "noise": noise.clone(), "t": t.clone(),
                "cond": {k: v.detach().clone() for k, v in cond.items()}})
        return real["denoising_error"](unet, scheduler, x0, noise, t, cond)

    def make_optimizer(params, args):
        optimizer = real["make_optimizer"](params, args)
        if context[0] is None or "grad_norms" not in context[0]:
            return optimizer
        norms = context[0]["grad_norms"]

        def before_step(optimizer, *_):  # the gradient the update will use, after clipping
            grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads])).item())
        optimizer.register_step_pre_hook(before_step)
        return optimizer

    def judge_candidates(pipe, judge_ref, prompts, indices, args, stage):
        record = {"stage": stage, "prompts": list(prompts), "judged": [],
                  "encode": lambda prompts: sail.encode_text(pipe, prompts, args)}
        seen["judge"].append(record)
        return within(record, lambda: real["judge_candidates"](pipe, judge_ref, prompts, indices,
                                                               args, stage))

    def generate(pipe, prompts, n, args, generator):
        generators = generator if isinstance(generator, list) else [generator]
        states = [g.get_state() for g in generators if g is not None]  # before the sampler draws
        latents = real["generate"](pipe, prompts, n, args, generator)
        if context[0] is None:
            return latents
        context[0]["generated"] = {"prompts": list(prompts), "n": n, "latents": latents.clone(),
                                   "model": denoises(pipe.unet), "states": states,
                                   "sampler": type(pipe.scheduler).__name__}
        return latents

    def implicit_reward(unet, ref_unet, latents, text_emb, *args, **kwargs):
        rewards = real["implicit_reward"](unet, ref_unet, latents, text_emb, *args, **kwargs)
        given = inspect.signature(real["implicit_reward"]).bind(
            unet, ref_unet, latents, text_emb, *args, **kwargs).arguments
        if context[0] is None or "judged" not in context[0]:
            return rewards  # Eq. 8 outside self-labelling (a held-out judge accuracy, say)
        text = text_emb["encoder_hidden_states"] if isinstance(text_emb, dict) else text_emb
        context[0]["judged"].append({"latents": latents.clone(), "text": text.clone(),
                                     "rewards": rewards.clone(), "theta": denoises(unet),
                                     "ref": denoises(ref_unet), "k": given["k"],
                                     "beta": given["beta"]})
        return rewards

    def evaluate(pipe, args, folder, eval_prompts):
        record = {"stage": Path(folder).name}
        seen["evaluate"].append(record)
        return within(record, lambda: real["evaluate"](pipe, args, folder, eval_prompts))

    for name in real:
        monkeypatch.setattr(sail, name, locals()[name])
    return seen


# Every wiring test runs twice: full fine-tuning, and LoRA, whose DPO reference is the trained UNet
# with its adapters off (each stage's merged UNet is saved, so the same checks read both).
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--save-merged", "--lr", "1e-2"]


@pytest.fixture(scope="session", params=["full", pytest.param("lora", marks=needs_peft)])
def wired_run(request, tmp_path_factory, tiny_base):
    """(run folder, records): two SAIL iterations, reward ref 'prev', every step spied on."""
    out = tmp_path_factory.mktemp(f"wired-{request.param}") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = spy_on_sail(monkeypatch)
        assert sail.main([*WIRED, *(LORA if request.param == "lora" else []), "--out", str(out)]) == 0
    return out, seen


@pytest.fixture(scope="session")
def wired_models(wired_run):
    """What each stage's saved model denoises; the stages differ, so a wrong model is noticed."""
    out, _ = wired_run
    models = {stage: denoises(saved_unet(out, stage)) for stage in WIRED_STAGES}
    assert all((models[a] - models[b]).abs().max() > 1e-2  # measured: 0.04 and more
               for i, a in enumerate(WIRED_STAGES) for b in WIRED_STAGES[i + 1:])
    return models


def test_every_dpo_stage_starts_at_ln2_and_its_later_steps_leave_it(wired_run):
    out, _ = wired_run
    steps = [r for r in records(out) if "step" in r]
    for stage in WIRED_STAGES[1:]:
        mine = [r for r in steps if r["stage"] == stage]
        assert [r["step"] for r in mine] == [1, 2, 3]
        # step 1: theta == ref, so every logit is 0 (a reference other than theta's start is not)
        assert mine[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert mine[0]["implicit_acc"] == 0
        # later steps: theta has moved, ref has not (a reference that follows theta stays at ln 2)
        assert all(abs(r["loss"] - math.log(2)) > 1e-3 for r in mine[1:])
        assert any(r["implicit_acc"] > 0 for r in mine[1:])


def test_each_stage_trains_from_and_against_the_model_the_stage_before_saved(wired_run,
                                                                             wired_models):
    """eps^i = DiffusionDPO(init=eps^{i-1}, ref=eps^{i-1}); step 0: init = ref = base."""
    _, seen = wired_run
    assert [r["stage"] for r in seen["dpo"]] == WIRED_STAGES[1:]
    for record in seen["dpo"]:
        before = wired_models[stage_before(record["stage"])]
        assert same_model(record["theta"], before), f"{record['stage']}: theta's start"
        assert same_model(record["ref"], before), f"{record['stage']}: the DPO reference"


def test_candidates_are_drawn_and_judged_by_the_current_model_with_the_chosen_sampler(
        wired_run, wired_models):
    """Iteration i samples x_1..x_N from eps^{i-1} and Eq. 8's theta is eps^{i-1}."""
    _, seen = wired_run
    assert sorted({r["stage"] for r in seen["judge"]}) == ["iter_1", "iter_2"]
    for record in seen["judge"]:
        current = wired_models[stage_before(record["stage"])]
        assert same_model(record["generated"]["model"], current), f"{record['stage']}: sampler"
        assert record["generated"]["sampler"] == "DDIMScheduler"  # --sampler ddim (tiny preset)
        assert all(same_model(j["theta"], current) for j in record["judged"])


def test_reward_ref_prev_judges_against_the_reference_of_the_previous_round(wired_run,
                                                                           wired_models):
    """--reward-ref prev: Eq. 8's ref in iteration i is eps^{i-2}, the model round i-1 started
    from (the base for i = 1); it is not eps^{i-1} itself, which would tie every candidate."""
    out, seen = wired_run
    expected = {"iter_1": "base", "iter_2": "iter_0"}
    for record in seen["judge"]:
        assert all(same_model(j["ref"], wired_models[expected[record["stage"]]])
                   for j in record["judged"]), record["stage"]
    summaries = {r["stage"]: r for r in records(out) if r.get("event") == "summary"}
    assert summaries["iter_1"]["self_pairs"] > 0 and summaries["iter_2"]["self_pairs"] > 0


def test_each_iteration_judges_its_own_disjoint_prompt_slice(wired_run):
    _, seen = wired_run
    prompts = plumbing.read_prompts(HERE / "prompts.txt")
    judged = {stage: [p for r in seen["judge"] if r["stage"] == stage for p in r["prompts"]]
              for stage in ("iter_1", "iter_2")}
    # --prompts-per-iter 4: iteration i takes lines 4(i-1) .. 4i-1 of prompts.txt, in order
    assert judged == {"iter_1": prompts[0:4], "iter_2": prompts[4:8]}
    assert not set(judged["iter_1"]) & set(judged["iter_2"])  # the file's first 8 differ


def test_each_prompts_candidates_are_judged_together_under_its_own_prompt(wired_run):
    _, seen = wired_run
    for record in seen["judge"]:
        generated = record["generated"]
        assert generated["prompts"] == record["prompts"] and generated["n"] == 3
        # Eq. 8 sees every sampled candidate once, prompt by prompt, N at a time
        assert [j["latents"].shape[0] for j in record["judged"]] == [3] * len(record["prompts"])
        torch.testing.assert_close(torch.cat([j["latents"] for j in record["judged"]]),
                                   generated["latents"], rtol=0, atol=0)
        for prompt, judged in zip(record["prompts"], record["judged"]):
            assert (judged["k"], judged["beta"]) == (2, 5000)  # --k-draws 2, --beta 5000
            own = record["encode"]([prompt])["encoder_hidden_states"]           # (1, L, D)
            torch.testing.assert_close(judged["text"], own, rtol=1e-5, atol=1e-5)


def judged_prompts(seen, stage):
    """[(prompt, Eq. 8's record for its N candidates)] of one iteration, in prompt order."""
    return [(prompt, judged) for r in seen["judge"] if r["stage"] == stage
            for prompt, judged in zip(r["prompts"], r["judged"])]


def test_pairs_json_and_pair_images_say_what_eq8_ranked(wired_run):
    """Each untied prompt gives one pair: chosen = argmax of its Eq. 8 rewards, rejected = argmin,
    confidence = Eq. 9 > 0.5; the PNGs are those two candidates, decoded."""
    out, seen = wired_run
    vae = AutoencoderKL.from_pretrained(out / "tiny_base" / "vae")
    for stage in ("iter_1", "iter_2"):
        untied = [(prompt, judged) for prompt, judged in judged_prompts(seen, stage)
                  if not torch.isclose(judged["rewards"].max(), judged["rewards"].min())]
        pairs = json.loads((out / stage / "pairs.json").read_text())
        assert len(pairs) == len(untied) > 0
        for pair, (prompt, judged) in zip(pairs, untied):
            rewards = judged["rewards"]
            best, worst = int(rewards.argmax()), int(rewards.argmin())
            assert pair["prompt"] == prompt
            assert pair["reward_chosen"] == pytest.approx(rewards[best].item(), abs=1e-6)
            assert pair["reward_rejected"] == pytest.approx(rewards[worst].item(), abs=1e-6)
            assert pair["confidence"] == pytest.approx(
                torch.sigmoid(rewards[best] - rewards[worst]).item(), abs=1e-6)
            assert pair["confidence"] > 0.5
            decoded = sail.decode_latents(vae, judged["latents"][[best, worst]])  # (2, 3, 16, 16)
            assert (decoded[0] - decoded[1]).abs().max() > 8 / 255  # the check can tell them apart
            for key, image in zip(("chosen", "rejected"), decoded):
                saved = plumbing.load_image(out / stage / pair[key], 16) / 2 + 0.5
                assert (saved - image).abs().max() <= 1.5 / 255, f"{stage} {prompt}: {key}"


def pair_key(pair, folder=None):
    """A pair's identity: its prompt and its two images (self-labelled: relative to its stage)."""
    images = [os.path.relpath(pair[k], folder) if folder else str(pair[k])
              for k in ("chosen", "rejected")]
    return (pair["prompt"], *images)


def test_each_iteration_trains_on_its_self_labelled_pairs_mixed_with_seed_pairs(wired_run):
    """D_0 = the seed pairs; D_i = the iteration's pairs.json plus (1 - alpha) / alpha = 3 times
    as many seed pairs."""
    out, seen = wired_run
    seeds = [pair_key(p) for p in plumbing.read_seed_pairs(HERE / "seed_pairs.json")]
    trained = {r["stage"]: r["pairs"] for r in seen["dpo"]}
    assert [pair_key(p) for p in trained["iter_0"]] == seeds
    for stage in ("iter_1", "iter_2"):
        folder = out / stage
        own = sorted(pair_key(p) for p in json.loads((folder / "pairs.json").read_text()))
        mixed = [pair_key(p, folder) if Path(p["chosen"]).is_relative_to(folder) else pair_key(p)
                 for p in trained[stage]]
        self_labelled = sorted(key for key in mixed if key not in seeds)
        assert self_labelled == own and len(own) > 0
        assert len(mixed) == 4 * len(own)  # |D_i| = |S_i| / alpha, alpha = 0.25


def posterior(vae, paths):
    """The VAE posterior of each image file: (mean, std), each (B, 4, 8, 8), unscaled."""
    images = torch.stack([plumbing.load_image(path, 16) for path in paths])
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def log_likelihood(x, mean, std):
    """log N(x; mean, std^2) summed over each sample's latent: (B,)."""
    return torch.distributions.Normal(mean, std).log_prob(x).sum((1, 2, 3))


def dpo_calls(seen, stage):
    """[(step's batch of pairs, theta's denoising_error call)] of one DPO stage."""
    record = next(r for r in seen["dpo"] if r["stage"] == stage)
    steps = []
    for step in record["steps"]:
        assert [c["model"] for c in step["calls"]] == ["theta", "ref"]  # one micro-batch a step
        steps.append((step["batch"], step["calls"][0]))
    return steps


def test_seed_pairs_train_on_scaled_vae_posterior_samples_each_with_its_own_noise(wired_run):
    """x_0 = scaling_factor * (mean + std * z) of the right image, winners then losers, and the
    posterior noises z of the winner and the loser are independent N(0, 1) draws."""
    out, seen = wired_run
    vae = AutoencoderKL.from_pretrained(out / "tiny_base" / "vae")
    scale = vae.config.scaling_factor
    assert abs(scale - 1) > 0.05  # the check can tell a scaled latent from an unscaled one
    z = {"chosen": [], "rejected": []}
    for batch, call in dpo_calls(seen, "iter_0"):
        x0 = call["x0"] / scale
        b = len(batch)
        for key, other, rows in (("chosen", "rejected", x0[:b]), ("rejected", "chosen", x0[b:])):
            mean, std = posterior(vae, [p[key] for p in batch])
            other_mean, other_std = posterior(vae, [p[other] for p in batch])
            # each row is a draw from its own image's posterior, not the other image's
            assert torch.all(log_likelihood(rows, mean, std)
                             > log_likelihood(rows, other_mean, other_std)), key
            z[key].append((rows - mean) / std)
    z_w, z_l = torch.cat(z["chosen"]), torch.cat(z["rejected"])               # (S*B, 4, 8, 8)
    both = torch.cat([z_w, z_l])
    assert abs(both.mean().item()) < 0.05 and abs(both.std().item() - 1) < 0.03
    correlation = torch.corrcoef(torch.stack([z_w.flatten(), z_l.flatten()]))[0, 1]
    assert abs(correlation.item()) < 0.05


def test_what_trains_as_chosen_is_what_eq8_ranked_higher(wired_run):
    """A self-labelled pair trains its Eq. 8 winner as x_w and its loser as x_l: the very
    latents Eq. 8 ranked best and worst (SPEC: what Eq. 8 judges is what DPO trains on)."""
    out, seen = wired_run
    rows = 0
    for stage in ("iter_1", "iter_2"):
        judged = dict(judged_prompts(seen, stage))
        assert len(judged) == 4  # each prompt of the slice once, so a prompt names its candidates
        for batch, call in dpo_calls(seen, stage):
            b = len(batch)
            for i, pair in enumerate(batch):
                if pair["prompt"] not in judged or "reward_chosen" not in pair:
                    continue  # a seed pair
                candidates, rewards = (judged[pair["prompt"]][k] for k in ("latents", "rewards"))
                assert torch.equal(call["x0"][i], candidates[int(rewards.argmax())])
                assert torch.equal(call["x0"][b + i], candidates[int(rewards.argmin())])
                rows += 1
    assert rows > 0


def test_winner_and_loser_share_prompt_t_and_noise_and_about_a_fifth_of_prompts_are_empty(
        wired_run):
    """Eq. DPO: x_w and x_l share t, eps and the conditioning (an empty prompt for both, 20% of
    pairs: --cfg-dropout); theta and ref see the very same inputs."""
    _, seen = wired_run
    empty = total = 0
    for record in seen["dpo"]:
        blank = record["encode"]([""])["encoder_hidden_states"]                  # (1, L, D)
        for step in record["steps"]:
            theta, ref = step["calls"]
            for name in ("x0", "noise", "t"):
                assert torch.equal(theta[name], ref[name]), name
            assert torch.equal(theta["cond"]["encoder_hidden_states"],
                               ref["cond"]["encoder_hidden_states"])
            b = len(step["batch"])
            for name in ("noise", "t"):
                assert torch.equal(theta[name][:b], theta[name][b:]), name
            assert not torch.equal(theta["x0"][:b], theta["x0"][b:])
            hidden = theta["cond"]["encoder_hidden_states"]                       # (2B, L, D)
            assert torch.equal(hidden[:b], hidden[b:])
            own = record["encode"]([p["prompt"] for p in step["batch"]])["encoder_hidden_states"]
            for row, prompt_row in zip(hidden[:b], own):
                dropped = torch.allclose(row, blank[0], atol=1e-5)
                assert dropped or torch.allclose(row, prompt_row, atol=1e-5)
                empty, total = empty + dropped, total + 1
    assert 0 < empty < 0.4 * total  # 20% expected: 27 of 144 drawn with this seed


def test_every_dpo_update_uses_a_fresh_gradient_clipped_to_norm_1(wired_run):
    _, seen = wired_run
    for record in seen["dpo"]:
        assert not any(step["stale_grads"] for step in record["steps"])  # zeroed after each step
        norms = record["grad_norms"]
        assert len(norms) == 3 and max(norms) <= 1 + 1e-4
        assert any(n == pytest.approx(1, abs=1e-3) for n in norms)  # the clip was needed: beta 5000


def test_every_stage_is_evaluated_on_the_same_noise(wired_run):
    _, seen = wired_run
    assert [r["stage"] for r in seen["evaluate"]] == WIRED_STAGES
    first = seen["evaluate"][0]["generated"]
    for record in seen["evaluate"][1:]:
        assert record["generated"]["prompts"] == first["prompts"]
        assert all(torch.equal(a, b) for a, b in zip(record["generated"]["states"], first["states"]))
        assert len(record["generated"]["states"]) == len(first["states"])


def test_a_resume_after_two_finished_stages_continues_from_the_last(wired_run, tmp_path):
    """iter_0 and iter_1 finished, iter_2 lost: the resumed run redoes iter_2 from iter_1's model
    and ends with the very model and metrics of the uninterrupted run."""
    out, _ = wired_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "iter_2")
    for path in (run / "checkpoints").glob("iter_2-*"):
        path.unlink()
    assert sail.main(["--resume", str(run)]) == 0
    assert records(run) == records(out)
    ours, theirs = saved_unet(run, "iter_2").state_dict(), saved_unet(out, "iter_2").state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_every_trained_stage_measures_its_judge_on_the_held_out_pairs(wired_run):
    """judge_acc/heldout after stage i: eps^i against the reward reference iteration i+1 will
    judge with (here --reward-ref prev: base, then iter_0). Against eps^i itself every held-out
    pair would tie: exactly 0.5."""
    out, _ = wired_run
    summaries = {r["stage"]: r for r in records(out) if r.get("event") == "summary"}
    assert "judge_acc/heldout" not in summaries["base"]
    for stage in ("iter_0", "iter_1", "iter_2"):
        assert summaries[stage]["heldout_pairs"] == 32
        assert summaries[stage]["judge_acc/heldout"] != 0.5


# -------------------------------------------------------------------------------------------------
# LoRA (--lora-rank): adapters train, the reference is the UNet with them off, stages load back
# -------------------------------------------------------------------------------------------------

def load_stage_the_readme_way(base, run, stage):
    """The README's lines: stage iter_i = the base pipeline + the adapters of rounds 0..i."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    stages = [f"iter_{i}" for i in range(int(stage.split("_")[1]) + 1)]
    for name in stages:
        pipe.load_lora_weights(run / name / "lora", adapter_name=name)
    pipe.set_adapters(stages)
    return pipe


@pytest.mark.parametrize("wired_run", [pytest.param("lora", marks=needs_peft)], indirect=True)
def test_lora_stages_load_from_the_base_and_denoise_as_trained(wired_run, wired_models):
    out, seen = wired_run
    for stage in WIRED_STAGES[1:]:
        pipe = load_stage_the_readme_way(out / "tiny_base", out, stage)
        assert same_model(denoises(pipe.unet), wired_models[stage]), stage
        # the adapters of earlier rounds are part of the model: the last round's alone is not it
        alone = StableDiffusionPipeline.from_pretrained(out / "tiny_base")
        alone.load_lora_weights(out / stage / "lora")
        assert stage == "iter_0" or not same_model(denoises(alone.unet), wired_models[stage])
    # and the trained model itself, as the next round started from it, denoised the same
    assert same_model(seen["dpo"][-1]["theta"], denoises(
        load_stage_the_readme_way(out / "tiny_base", out, "iter_1").unet))


@pytest.mark.parametrize("wired_run", [pytest.param("lora", marks=needs_peft)], indirect=True)
def test_lora_trains_only_the_attention_projections(wired_run):
    """Every weight LoRA does not adapt is the base's, bit for bit, after three merged rounds."""
    out, _ = wired_run
    base, final = saved_unet(out, "base").state_dict(), saved_unet(out, "iter_2").state_dict()
    adapted = [name for name in base if name.endswith(  # W += (alpha / r) B A; biases stay
        tuple(f".{module}.weight" for module in plumbing.LORA_MODULES))]
    assert adapted and all(not torch.equal(base[name], final[name]) for name in adapted)
    assert all(torch.equal(base[name], final[name]) for name in base if name not in adapted)


@pytest.mark.parametrize("wired_run", [pytest.param("lora", marks=needs_peft)], indirect=True)
def test_a_lora_run_killed_mid_stage_is_finished_by_two_processes(wired_run, tmp_path,
                                                                  monkeypatch):
    """Killed at iter_1's second DPO step (its checkpoint: the adapters and their AdamW state
    only), the run is resumed by torchrun in two processes: base + iter_0's adapters merged,
    iter_1's adapters from the checkpoint; the result is the uninterrupted run's."""
    expected, _ = wired_run
    out = tmp_path / "run"
    count_calls(monkeypatch, "dpo_loss", crash_at=5)  # iter_0: 3 steps; iter_1: step 2
    with pytest.raises(Crash):
        sail.main([*WIRED, *LORA, "--out", str(out), "--checkpoint-every", "1"])
    checkpoint = torch.load(out / "checkpoints" / "iter_1-step000001.pt", weights_only=True)
    assert checkpoint["unet"] and all(".lora_" in name for name in checkpoint["unet"])
    torchrun("--resume", str(out))
    assert_same_up_to_rounding(expected, out)


@needs_peft
def test_lora_adapters_are_scaled_alpha_over_rank_and_start_at_zero_from_their_own_seed(tiny_base):
    args = sail.parse_args(["--tiny", "--lora-rank", "4", "--lora-alpha", "8"])
    unets = [UNet2DConditionModel.from_pretrained(Path(tiny_base) / "unet") for _ in range(2)]
    refs = []
    for global_seed, unet in enumerate(unets):  # the global generator must not matter
        torch.manual_seed(global_seed)
        refs.append(plumbing.begin_lora_round(unet, args, "iter_0"))
    layers = [unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q for unet in unets]
    assert layers[0].r["iter_0"] == 4 and layers[0].scaling["iter_0"] == 2.0  # alpha / r
    assert not layers[0].lora_B["iter_0"].weight.any()  # B = 0: theta == ref at step 1
    assert torch.equal(layers[0].lora_A["iter_0"].weight, layers[1].lora_A["iter_0"].weight)
    assert layers[0].lora_A["iter_0"].weight.std().item() == pytest.approx(1 / 4, rel=0.2)
    assert torch.equal(denoises(unets[0]), denoises(refs[0]))
    assert [n for n, p in unets[0].named_parameters() if p.requires_grad] == [
        n for n, _ in unets[0].named_parameters() if ".lora_" in n]


@needs_peft
def test_lora_defaults_and_bad_values(tiny_base, tmp_path, capsys, earlier_run):
    assert sail.parse_args(["--tiny", "--lora-rank", "4"]).lr == plumbing.LORA_LR["tiny"]
    assert sail.parse_args(["--tiny", "--lora-rank", "4", "--lr", "0.5"]).lr == 0.5
    assert sail.parse_args(["--model", str(tiny_base), "--lora-rank", "4"]).lr == plumbing.LORA_LR["real"]
    for flags, message in [(["--lora-rank", "-1"], "--lora-rank must be >= 0"),
                           (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0"),
                           (["--save-merged"], "--save-merged needs --lora-rank")]:
        code = sail.main(["--tiny", "--out", str(earlier_run), *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


@needs_peft
def test_lora_on_a_unet_without_attention_exits_2_before_writing(tmp_path, tiny_base, capsys):
    model = tmp_path / "no-attention"
    base = StableDiffusionPipeline.from_pretrained(tiny_base)
    base.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        mid_block_type=None, cross_attention_dim=32, norm_num_groups=8)
    base.save_pretrained(model)
    code = sail.main(["--model", str(model), "--lora-rank", "4", "--out", str(tmp_path / "o"),
                      *TINY_DATA])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "has none of the attention projections LoRA adapts (to_q, to_k" in err
    assert not (tmp_path / "o").exists()


def test_lora_without_peft_installed_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    code = sail.main(["--tiny", "--lora-rank", "4", "--out", str(tmp_path / "o")])
    assert code == 2 and "--lora-rank needs the peft package: pip install peft" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("wired_run", [pytest.param("lora", marks=needs_peft)], indirect=True)
def test_evaluate_scores_a_lora_run_through_its_adapters_as_its_merged_unets(wired_run, tmp_path):
    """evaluate.py loads a LoRA run's stages as base + adapters; the same run read through its
    merged UNets (config.json saying full fine-tuning) scores the same."""
    import evaluate
    out, _ = wired_run
    merged = tmp_path / "as-merged"
    shutil.copytree(out, merged)
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "lora_rank": 0}))
    tables = []
    for run in (out, merged):
        assert evaluate.main([str(run), "--seeds", "1", "--models", "iter_2,base,iter_1",
                              "--out", str(tmp_path / run.name / "eval")]) == 0
        with open(tmp_path / run.name / "eval" / "results.csv") as handle:
            tables.append(list(csv.DictReader(handle)))
    assert [r["model"] for r in tables[0]] == ["iter_2", "base", "iter_1"]
    for lora, full in zip(*tables):
        assert float(lora["annotator"]) == pytest.approx(float(full["annotator"]), abs=1e-3)
    assert tables[0][0]["annotator"] != tables[0][1]["annotator"]  # the stages differ


@needs_peft
def test_gradient_checkpointing_trains_lora_adapters_as_without_it(tmp_path):
    """Checkpointed blocks whose inputs need no gradient must still pass one to the adapters."""
    losses = []
    for flags in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"run{len(losses)}"
        assert sail.main([*RESUMABLE, "--iters", "0", "--dpo-steps", "3", *LORA[:2],
                          "--out", str(out), *flags]) == 0
        losses.append([r["loss"] for r in records(out) if "step" in r])
    assert losses[0] == losses[1] and abs(losses[0][-1] - math.log(2)) > 1e-3


# -------------------------------------------------------------------------------------------------
# The second evidence study (issue 19): two variant worlds, each one change to the tiny world
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def back_to_shapes():
    """A variant run leaves its world set in this process: the next test starts in shapes again."""
    yield
    tiny_world.use_world("shapes")


def test_offpolicy_world_changes_only_the_background_of_the_human_images():
    prompts = tiny_world.PROMPTS * 4
    plain = tiny_world.draw_images(prompts, torch.Generator().manual_seed(3))
    grey = tiny_world.offpolicy_images(prompts, torch.Generator().manual_seed(3))
    painted = plain.amax(1, keepdim=True) > 0
    assert torch.equal(grey * painted, plain)
    assert (grey * ~painted).amax() < 0.25  # fidelity's paint mask ignores it
    assert (grey.amax(1) > 0).all()  # no black pixel left: a background the base never draws
    shift = tiny_world.annotator_score(grey, prompts) - tiny_world.annotator_score(plain, prompts)
    assert shift.abs().max() < 2  # the annotator barely scores it (near-ties < 1 point are dropped)


def test_taste_world_prefers_by_prompt_and_its_seed_pairs_cover_each_word():
    def shape(radius, brightness, rgb):
        grid = torch.arange(16.0) - 7.5
        disc = (grid.view(-1, 1).abs() <= radius) & (grid.view(1, -1).abs() <= radius)
        return brightness * torch.tensor(rgb).view(3, 1, 1) * disc
    green, red = (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)
    images = torch.stack([shape(4, 0.5, green), shape(4, 1.0, green),     # dim, bright
                          shape(2.5, 1.0, red), shape(5.5, 1.0, red)])    # small, large
    score = tiny_world.taste_score(images, ["a green square"] * 2 + ["a red square"] * 2)
    assert score[0] > score[1] and score[2] > score[3]
    assert tiny_world.annotator_score(images[2:], ["a red square"] * 2).argmax() == 1  # shapes: large
    pairs = json.loads((HERE / "worlds" / "taste" / "seed_pairs.json").read_text())
    seen = {p["prompt"] for p in pairs}
    assert seen == set(tiny_world.TASTE_SEEN)
    assert {tiny_world.parse_prompt(p)[0] for p in seen} == set(tiny_world.COLOURS)
    assert {tiny_world.parse_prompt(p)[1] for p in seen} == set(tiny_world.SHAPES)


@pytest.mark.parametrize("world", ["offpolicy", "taste"])
def test_variant_world_pairs_rebuild_bit_identical(world, tmp_path, capsys):
    assert tiny_world.main(["seed-pairs", "--world", world, "--out", str(tmp_path / "p")]) == 0
    assert (f"pairs of the {world} world: bit-identical to the shipped"
            in capsys.readouterr().out)


def test_a_variant_run_uses_its_own_pairs_and_annotator(tmp_path, back_to_shapes):
    import evidence
    out = tmp_path / "evidence"
    assert evidence.main(["--quick", "--world", "taste", "--seeds", "2",
                          "--conditions", "sail", "--out", str(out)]) == 0
    config = json.loads((out / "runs" / "sail-seed0" / "config.json").read_text())
    assert config["tiny_world"] == "taste"
    assert config["seed_pairs"] == str(HERE / "worlds" / "taste" / "seed_pairs.json")
    assert config["heldout_pairs"] == str(HERE / "worlds" / "taste" / "heldout_pairs.json")
    results = (out / "results.md").read_text()
    assert "Tiny world 'taste', 2 seeds" in results and "Does confidence rank" in results
    summary = json.loads((out / "runs" / "sail-seed0" / "iter_1" / "summary.json").read_text())
    assert "judge_acc/heldout" in summary and "annotator/unseen" in summary


def test_keep_top_condition_lets_the_ranking_act():
    import evidence
    flags = evidence.CONDITIONS["sail-keep-top"]
    assert float(flags[flags.index("--keep-top") + 1]) == evidence.KEEP_TOP < 1
    names = [claim for claim, control, _ in evidence.CLAIMS]
    assert not any("ranked mixup" in name for name in names)  # alpha = 1 tests mixup, not ranking


def test_tiny_world_bad_input(tmp_path, tiny_base, capsys):
    code = sail.main(["--tiny", "--tiny-world", "sphere", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --tiny-world must be one of shapes, offpolicy, taste"]
    model = tmp_path / "m"
    shutil.copytree(tiny_base, model)
    code = sail.main(["--model", str(model), "--tiny-world", "taste", "--out", str(tmp_path / "o")])
    assert code == 2 and "--tiny-world needs the tiny world (--tiny)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--world", "sphere"], "--world: unknown world sphere"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_evidence_variant_bad_input(tmp_path, capsys, argv, message):
    import evidence
    assert evidence.main([*argv, "--out", str(tmp_path / "e")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "e").exists()
