"""LoRA (--lora-rank): adapters, the reference with them off, stages loaded back, resume."""

import copy
import csv
import gc
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

import plumbing
import sail
from conftest import (LORA, RESUMABLE, TINY_DATA, WIRED, WIRED_STAGES, Crash,
                      assert_same_up_to_rounding, count_calls, denoises, needs_peft, records,
                      same_model, saved_unet, torchrun)

# -------------------------------------------------------------------------------------------------
# LoRA (--lora-rank): adapters train, the reference is the UNet with them off, stages load back
# -------------------------------------------------------------------------------------------------

def load_stage_the_readme_way(base, run, stage, dtype=torch.float32):
    """The README's lines: stage iter_i = the base pipeline + the adapters of rounds 0..i."""
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype)
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
    """Every weight LoRA does not adapt is the base's, bit for bit, after three rounds (merged to save)."""
    out, _ = wired_run
    base, final = saved_unet(out, "base").state_dict(), saved_unet(out, "iter_2").state_dict()
    adapted = [name for name in base if name.endswith(  # W += (alpha / r) B A; biases stay
        tuple(f".{module}.weight" for module in plumbing.ATTENTION))]
    assert adapted and all(not torch.equal(base[name], final[name]) for name in adapted)
    assert all(torch.equal(base[name], final[name]) for name in base if name not in adapted)


@pytest.mark.parametrize("wired_run", [pytest.param("lora", marks=needs_peft)], indirect=True)
def test_a_lora_run_killed_mid_stage_is_finished_by_two_processes(wired_run, tmp_path,
                                                                  monkeypatch):
    """Killed at iter_1's second DPO step (its checkpoint: the adapters and their AdamW state
    only), the run is resumed by torchrun in two processes: base + iter_0's adapters,
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
def test_lora_default_alpha_is_the_rank_in_training_and_in_the_saved_adapters(tiny_base, tmp_path):
    """No --lora-alpha: alpha = rank, so the update B A is applied unscaled (alpha / r = 1), and
    the saved adapters say so, as diffusers' load_lora_weights will read them."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    plumbing.begin_lora_round(pipe.unet, sail.parse_args(["--tiny", "--lora-rank", "4"]), "iter_0")
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    assert layer.r["iter_0"] == 4 and layer.scaling["iter_0"] == 1.0
    plumbing.save_adapters(pipe, tmp_path, "iter_0")
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as saved:
        metadata = json.loads(saved.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 4


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
# LoRA on a half-precision base: one network, frozen in --precision, rounds kept as adapters
# -------------------------------------------------------------------------------------------------

def tensor_bytes(exclude=()):
    """Bytes of every tensor storage the process holds, except those in `exclude` (data_ptr).
    Tensors without data (meta, and the fake tensors torch.compile leaves behind in an earlier
    test, bench.py's part 6) hold no memory."""
    from torch._subclasses.fake_tensor import FakeTensor
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if (isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta
                and not isinstance(obj, FakeTensor)):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
    return storages


def take_census(monkeypatch, before):
    """At every DPO stage and every Eq. 8 call: the networks the run holds and the bytes of the
    tensors it made, with the dtypes of the trained network's own weights and adapters."""
    seen = []

    def census(name):
        real = getattr(sail, name)

        def counted(pipe, *args, **kwargs):
            unet = pipe.unet
            networks = [o for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)
                        and id(o) not in before["networks"]]
            seen.append({"call": name, "networks": len(networks),
                         "bytes": sum(tensor_bytes(before["storages"]).values()),
                         "pipeline_bytes": sum(p.nbytes for part in (pipe.unet, pipe.vae, pipe.text_encoder)
                                               for p in [*part.parameters(), *part.buffers()]),
                         "base_dtypes": {p.dtype for n, p in unet.named_parameters() if ".lora_" not in n},
                         "adapter_dtypes": {p.dtype for n, p in unet.named_parameters() if ".lora_" in n},
                         "rounds": plumbing.rounds_of(unet)})
            return real(pipe, *args, **kwargs)
        monkeypatch.setattr(sail, name, counted)
    for name in ("diffusion_dpo", "judge_candidates", "judge_agreement"):
        census(name)
    return seen


BF16_LORA = [*RESUMABLE, "--iters", "2", "--dpo-steps", "4", "--precision", "bf16",
             "--reward-ref", "prev", *LORA]


@needs_peft
def test_lora_on_a_bf16_base_holds_one_network_and_resumes_bit_for_bit(tmp_path, monkeypatch,
                                                                       capsys):
    """--precision bf16 --lora-rank: the network's own weights stay frozen in bf16, never copied
    (the process never holds a second network, nor the bytes of one), each round's adapters are
    fp32 and stay adapters; step 1 of every round is exactly ln 2; a run killed in iter_2 (after
    two finished rounds, whose adapters it reloads) ends as the uninterrupted run, bit for bit."""
    expected = tmp_path / "expected"
    kept = [o for o in gc.get_objects() if isinstance(o, UNet2DConditionModel)]  # held: ids stay
    before = {"networks": {id(o) for o in kept}, "storages": set(tensor_bytes())}
    with monkeypatch.context() as patch:
        seen = take_census(patch, before)
        assert sail.main([*BF16_LORA, "--out", str(expected)]) == 0
    calls = [s["call"] for s in seen]
    assert calls.count("diffusion_dpo") == calls.count("judge_agreement") == 3
    assert calls.count("judge_candidates") >= 2
    for s in seen:
        assert s["networks"] == 1, s  # the trained UNet, no frozen copy of it
        # what the run made is its pipeline plus small change (adapters, their AdamW moments,
        # latents): a copy of the UNet would add at least 1.6 MB (bf16) to the 0.3 MB here
        assert s["bytes"] < s["pipeline_bytes"] + 0.5 * 1.6e6, s
        assert s["base_dtypes"] == {torch.bfloat16} and s["adapter_dtypes"] <= {torch.float32}
    assert [s["rounds"] for s in seen if s["call"] == "diffusion_dpo"] == [
        ["iter_0"], ["iter_0", "iter_1"], ["iter_0", "iter_1", "iter_2"]]  # kept, not merged
    assert [r["loss"] for r in records(expected) if r.get("step") == 1] == pytest.approx(
        [math.log(2)] * 3, abs=1e-7)
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        count_calls(patch, "dpo_loss", crash_at=10)  # 4 + 4 steps, then iter_2's second step
        with pytest.raises(Crash):
            sail.main([*BF16_LORA, "--out", str(out), "--checkpoint-every", "1"])
    assert sail.main(["--resume", str(out)]) == 0
    assert records(out) == records(expected)
    # the README's lines in bf16 give the trained network up to its adapters' rounding to bf16
    # (both computed in fp32: 0.1% of what training moved, measured); fp32 would round the base
    args = sail.parse_args(["--resume", str(expected)])
    trained = StableDiffusionPipeline.from_pretrained(expected / "tiny_base", torch_dtype=torch.bfloat16)
    plumbing.restore_adapters(trained.unet, args, expected, ["iter_0", "iter_1", "iter_2"])
    loaded = load_stage_the_readme_way(expected / "tiny_base", expected, "iter_2", torch.bfloat16)
    trained, loaded = (denoises(copy.deepcopy(p.unet).float()) for p in (trained, loaded))
    moved = (trained - denoises(saved_unet(expected, "base"))).abs().max()
    assert (loaded - trained).abs().max() < 0.01 * moved
    # --save-merged: every round merged in fp32 onto the bf16 base, saved in fp32
    base, merged = saved_unet(expected, "base").state_dict(), saved_unet(expected, "iter_2").state_dict()
    assert {v.dtype for v in merged.values()} == {torch.float32}
    adapted = [n for n in base if n.endswith(tuple(f".{m}.weight" for m in plumbing.ATTENTION))]
    assert all(torch.equal(merged[n], base[n].bfloat16().float()) for n in base if n not in adapted)
    assert any(not torch.equal(merged[n], merged[n].bfloat16().float()) for n in adapted)
    # bench.py --lora-judge-of: at theta == ref every judge's spread is 0 (one network on the
    # same rounded weights); the truth has no error against itself; the others have some
    import bench
    capsys.readouterr()
    assert bench.tiny_lora_judge(expected, torch.device("cpu"), prompts=["a red square"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            capsys.readouterr().out.splitlines() if line.startswith("| ") and " base, " in line}
    assert list(rows) == ["fp32 base, fp32 (the truth)", "bf16 base, fp32", "bf16 base, bf16",
                          "fp16 base, fp32", "fp16 base, fp16"]
    assert all(cells[0] == "0" for cells in rows.values())
    assert rows["fp32 base, fp32 (the truth)"][4] == "0"
    assert all(float(cells[4]) > 0 for name, cells in rows.items() if "truth" not in name)


@needs_peft
def test_eq8_on_a_half_precision_base_computes_in_fp32_layer_by_layer(tiny_base):
    """judging: a bf16 base with fp32 adapters, Eq. 8 in fp32, gives exactly what the same
    network cast whole to fp32 gives, and the weights are bf16 again after it."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    args = sail.parse_args(["--tiny", "--lora-rank", "4", "--precision", "bf16"])
    sail.cast_frozen_models(pipe, "bf16", lora=True)
    plumbing.begin_lora_round(pipe.unet, args, "iter_0")
    with torch.no_grad():  # a trained round: B != 0
        for name, p in pipe.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    whole = copy.deepcopy(pipe.unet).float()
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = sail.encode_text(pipe, ["a red square"], args)
    scheduler = sail.training_schedule(pipe)

    def eq8(unet, ref):
        return sail.implicit_reward(unet, ref, latents, map_float(cond), scheduler, 5000.0, 4,
                                    torch.Generator().manual_seed(1))
    with sail.judging(pipe, args):
        rewards = eq8(pipe.unet, plumbing.Rounds(pipe.unet, []))
    assert torch.equal(rewards, eq8(whole, plumbing.Rounds(whole, [])))
    assert rewards.abs().min() > 0  # the adapters matter: not a comparison of zeros
    assert {p.dtype for n, p in pipe.unet.named_parameters() if ".lora_" not in n} == {torch.bfloat16}


def map_float(cond):
    return {k: v.float() for k, v in cond.items()}
