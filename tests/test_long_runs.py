"""A long job: resume, faults, Ctrl-C, several processes (torchrun), precision and memory options."""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from diffusers import UNet2DConditionModel

import plumbing
import sail
from conftest import (HERE, QUICK, RESUMABLE, Crash, assert_same_up_to_rounding, count_calls,
                      final_unet, latents, perturbed, records, reward, torchrun)


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


def assert_same_run(expected, run):
    assert records(run) == records(expected)
    assert (run / "iter_1" / "pairs.json").read_text() == (expected / "iter_1" / "pairs.json").read_text()
    for theirs in (expected / "iter_1" / "pairs").glob("*.pt"):  # the judged latents, bit for bit
        assert torch.equal(torch.load(theirs), torch.load(run / "iter_1" / "pairs" / theirs.name))
    theirs, ours = final_unet(expected), final_unet(run)
    assert all(torch.equal(theirs[name], ours[name]) for name in theirs)


def test_a_finished_stage_deletes_its_checkpoints(uninterrupted):
    assert list((uninterrupted / "checkpoints").iterdir()) == []  # each stage's UNet is saved


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


def test_a_stop_asked_after_the_last_step_says_the_run_finished_and_exits_0(tmp_path, monkeypatch,
                                                                            capsys):
    """Ctrl-C while the last stage is measured: no safe point is left, so the run finishes and
    says so; it never says 'stopped' (exit 130) about a run that finished."""
    real = sail.finish_stage

    def finish_stage(pipe, args, run, data, stage, *rest):
        if stage == "iter_1":  # the last stage, after its last DPO step
            run.ask_to_stop(signal.SIGINT, None)
        return real(pipe, args, run, data, stage, *rest)
    monkeypatch.setattr(sail, "finish_stage", finish_stage)
    assert sail.main([*RESUMABLE, "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "the stop came after the last step: the run finished" in captured.out
    assert "stopped" not in captured.err and (tmp_path / "run" / "iter_1" / "summary.json").exists()


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
                                                                          monkeypatch, capsys):
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
    said = capsys.readouterr().err  # never silently: one line per redone step
    assert (f"iter_0: step 1: fp16 gradients overflowed {first[0]['overflows']} time(s)" in said
            and said.count("fp16 gradients overflowed") == sum(r["overflows"] > 0 for r in steps))
    assert [r["overflows"] for r in steps if r["stage"] == "iter_1"][0] == 0  # scale carried over
    trained = UNet2DConditionModel.from_pretrained(out / "iter_0" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(out / "tiny_base" / "unet").state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # 3 steps, 3 updates


def test_fp16_keeps_a_vae_that_asks_for_it_in_fp32(pipe):
    pipe = copy.deepcopy(pipe)
    sail.cast_frozen_models(pipe, "fp16")
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float16 and pipe.unet.dtype == torch.float32
