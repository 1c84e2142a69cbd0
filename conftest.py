"""Shared fixtures and helpers of test_sail.py and tests/ (pytest loads this file first)."""

import copy
import importlib.util
import inspect
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing network must not hang a local load

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import sail
import tiny_world

HERE = Path(__file__).parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # optional: the plots
HAS_PEFT = importlib.util.find_spec("peft") is not None  # optional: --lora-rank
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed (optional: --lora-rank)")


def pytest_configure(config):
    config.addinivalue_line("markers", "optional: checks more when an optional package is "
                            "installed; CI's second step reruns it with every one (.ci/run)")


def pytest_runtest_logreport(report):
    """With SAIL_RERUN_FILE set (CI's first step), list the tests to run again once the optional
    packages are installed: those skipped for want of one, and those marked `optional`."""
    path = os.environ.get("SAIL_RERUN_FILE")
    if path and (report.skipped or (report.when == "call" and "optional" in report.keywords)):
        with open(path, "a") as listed:
            listed.write(report.nodeid + "\n")


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
# Eq. 8 and Eq. 9: the implicit reward and the preference it implies
# -------------------------------------------------------------------------------------------------

def reward(unet, ref, x, pipe, seed=0, **kwargs):
    cond = cond_for(pipe, ["a red circle"])["encoder_hidden_states"]  # (1, L, D)
    return sail.implicit_reward(unet, ref, x, cond, pipe.scheduler, 5000.0, 10,
                                torch.Generator().manual_seed(seed), **kwargs)


def argparse_like(**settings):
    return type("Settings", (), settings)


# -------------------------------------------------------------------------------------------------
# Whole runs: the tiny world, and the real-SD loading path on a saved pipeline
# -------------------------------------------------------------------------------------------------

QUICK = ["--dpo-steps", "3", "--n-candidates", "3", "--k-draws", "2", "--prompts-per-iter", "4",
         "--eval-seeds", "1", "--effective-batch", "8", "--micro-batch", "8"]


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


# -------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the entry and the problem; exit 2; earlier output untouched
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def earlier_run(tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    return out


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


def saved_unet(out, stage):
    return UNet2DConditionModel.from_pretrained(out / "tiny_base" / "unet" if stage == "base"
                                                else out / stage / "unet")


def spy_on_sail(monkeypatch):
    """Wrap sail's steps so that a run records what each was given; returns the records."""
    seen = {"dpo": [], "judge": [], "evaluate": [], "heldout": []}
    context = [None]  # the record of the step running now: a DPO stage, a judging call, an evaluation
    real = {name: getattr(sail, name) for name in (
        "diffusion_dpo", "dpo_step_data", "denoising_error", "make_optimizer", "judge_candidates",
        "generate", "implicit_reward", "evaluate", "judge_agreement")}

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

    def judge_agreement(pipe, judge_ref, heldout, args):  # once per trained stage, in run order
        seen["heldout"].append({"theta": denoises(pipe.unet), "ref": denoises(judge_ref)})
        return real["judge_agreement"](pipe, judge_ref, heldout, args)

    def evaluate(pipe, args, folder, eval_prompts):
        record = {"stage": Path(folder).name}
        seen["evaluate"].append(record)
        return within(record, lambda: real["evaluate"](pipe, args, folder, eval_prompts))

    for name in real:
        monkeypatch.setattr(sail, name, locals()[name])
    return seen


# Every wiring test runs twice: full fine-tuning, and LoRA, whose DPO reference is the trained UNet
# with the round's adapters off (each stage's merged UNet is saved, so the same checks read both).
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
