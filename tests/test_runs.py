"""Whole runs: the tiny world as a user runs it, the real-SD code path on saved pipelines, training schedules."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import (DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)

import plumbing
import sail
from conftest import (AT_16PX, HERE, QUICK, argparse_like, build_tiny_sdxl, latents, needs_peft,
                      records, run_saved_model)


def test_learning_rate_warms_up_linearly_at_most_a_quarter_of_the_stage(tmp_path, tiny_base):
    out = tmp_path / "run"
    assert sail.main(["--tiny", "--iters", "0", "--dpo-steps", "12", "--warmup-steps", "500",
                      "--effective-batch", "4", "--micro-batch", "4", "--eval-seeds", "1",
                      "--heldout-pairs", "none", "--out", str(out)]) == 0
    lrs = [r["lr"] for r in records(out) if "step" in r]  # warm-up min(500, 12 // 4) = 3 steps
    assert lrs == pytest.approx([3e-5 * f for f in (0.25, 0.5, 0.75)] + [3e-5] * 9)


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


def test_every_prompt_tied_says_why_and_what_to_change(tmp_path, tiny_base, capsys):
    assert sail.main(["--tiny", "--iters", "1", "--lr", "1e-30", *QUICK, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "equal within float tolerance" in out and "Raise --lr or --dpo-steps" in out


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


def test_a_dpo_step_reads_its_metrics_from_the_device_once(tmp_path, monkeypatch):
    """No host synchronisation per micro-batch: inside a step's gradient accumulation (4
    micro-batches here) nothing is read back to the host but the step's metrics, once."""
    reads, inside = [], [False]
    for name in ("item", "tolist", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k: (
            reads.append(_name) if inside[0] else None, _real(self, *a, **k))[1])
    accumulate = sail.accumulate_gradients

    def spied(*args, **kwargs):
        inside[0] = True
        try:
            return accumulate(*args, **kwargs)
        finally:
            inside[0] = False
    monkeypatch.setattr(sail, "accumulate_gradients", spied)
    assert sail.main(["--tiny", "--iters", "0", "--dpo-steps", "2", "--effective-batch", "8",
                      "--micro-batch", "2", "--eval-seeds", "1", "--heldout-pairs", "none",
                      "--out", str(tmp_path / "run")]) == 0
    assert reads == ["tolist", "tolist"]  # one read a step, two steps
