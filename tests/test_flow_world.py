"""The tiny flow world (--tiny-model flow): an SD3-shaped rectified-flow base on the tiny world."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file

import sail
import tiny_world
from conftest import QUICK, TINY_DATA, records


def test_flow_pretrain_command_builds_the_shipped_flow_base_on_the_ddpm_bases_autoencoder(tmp_path, capsys):
    out = tmp_path / "flow"
    assert tiny_world.main(["pretrain", "--model", "flow", "--steps", "2", "--out", str(out)]) == 0
    assert "pretrained the tiny flow base" in capsys.readouterr().out
    # every config and tokenizer file as shipped, the autoencoder's weights too (reused, never
    # trained): only what pretraining trains differs after 2 steps instead of the shipped 1200
    assert sorted(f.split(":")[0] for f in tiny_world.differences(out, tiny_world.FLOW_BASE)) == [
        "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors"]
    shipped_vae = load_file(tiny_world.FLOW_BASE / "vae" / "diffusion_pytorch_model.safetensors")
    ddpm_vae = load_file(tiny_world.BASE / "vae" / "diffusion_pytorch_model.safetensors")
    assert shipped_vae.keys() == ddpm_vae.keys()
    assert all(torch.equal(shipped_vae[k], ddpm_vae[k]) for k in ddpm_vae)  # the same latent space


def test_shipped_flow_base_is_an_sd3_shaped_rectified_flow_pipeline():
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_world.FLOW_BASE, text_encoder_3=None,
                                                    tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and sail.is_flow(pipe.scheduler)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    ddpm_vae = json.loads((tiny_world.BASE / "vae" / "config.json").read_text())
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (ddpm_vae["scaling_factor"], 0)


def test_flow_preset_changes_only_the_sampler_beta_and_lr_and_needs_the_tiny_world(tiny_base, capsys):
    ddpm, flow = vars(sail.parse_args(["--tiny"])), vars(sail.parse_args(["--tiny", "--tiny-model", "flow"]))
    assert {k for k in ddpm if ddpm[k] != flow[k]} <= {"tiny_model", "sampler", "beta", "lr"}
    assert (flow["sampler"], flow["beta"], flow["lr"]) == ("euler", 300, tiny_world.PRESETS["flow"]["lr"])
    assert sail.parse_args(["--tiny", "--tiny-model", "flow", "--beta", "5000"]).beta == 5000  # flags win
    assert sail.parse_args(["--tiny"]).tiny_model == "ddpm"  # the default world is unchanged
    assert sail.main(["--model", tiny_base, "--tiny-model", "flow", *TINY_DATA]) == 2
    assert "--tiny-model needs the tiny world" in capsys.readouterr().err


def test_flow_world_runs_end_to_end_from_a_copy_of_its_own_base(tmp_path, capsys):
    out = tmp_path / "run"
    assert sail.main(["--tiny", "--tiny-model", "flow", "--iters", "1", "--sample-steps", "3",
                      "--out", str(out), *QUICK]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["tiny_model"], config["sampler"]) == ("flow", "euler")
    assert tiny_world.differences(out / "tiny_base", tiny_world.FLOW_BASE) == []  # for --resume
    steps = [r for r in records(out) if "step" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: theta == ref
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["implicit_acc"]) for r in steps)
    summaries = {r["stage"]: r for r in records(out) if r.get("event") == "summary"}
    assert list(summaries) == ["base", "iter_0", "iter_1"]
    assert all(0 <= s["annotator"] <= 100 and 0 <= s["fidelity"] <= 1 for s in summaries.values())
    assert 0 <= summaries["iter_1"]["judge_acc/heldout"] <= 1
    trained = SD3Transformer2DModel.from_pretrained(out / "iter_1" / "transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "tiny_base", transformer=trained,
                                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2, height=16, width=16,
                output_type="pt").images.shape == (1, 3, 16, 16)


def test_sd3_and_flux_presets_take_the_beta_measured_for_velocity_errors():
    """results/flow-beta/: at 5000 velocity errors saturate the sigmoid from the first step."""
    for family in ("StableDiffusion3Pipeline", "FluxPipeline"):
        assert sail.PRESETS[family]["beta"] == 300
    assert "beta" not in sail.PRESETS["StableDiffusionXLPipeline"]  # SD, SDXL: the paper's 5000
