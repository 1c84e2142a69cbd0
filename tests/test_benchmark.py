"""bench.py: the CPU benchmark and --gpu-figures at toy sizes."""

import csv
import json

import pytest
import torch

import sail
from conftest import HAS_MATPLOTLIB, HAS_PEFT


@pytest.mark.optional  # matplotlib: the plot
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
# bench.py --gpu-figures (the GPU figures of the README) at toy sizes on the CPU: every code path
# of the GPU run executes here, so a typo cannot waste GPU time
# -------------------------------------------------------------------------------------------------

def figure_rows(out):
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.optional  # peft: part 4's LoRA row
def test_gpu_figures_toy_writes_every_row_of_every_part(tmp_path):
    import bench
    out = tmp_path / "figures"
    assert bench.main(["--gpu-figures", "--toy", "--out", str(out)]) == 0
    rows = figure_rows(out)
    assert list(rows[0]) == bench.FIGURE_FIELDS
    assert all(r["status"] == "ok" or not HAS_PEFT and r["status"].startswith("skipped: --lora-rank "
               "needs the peft package") for r in rows), [r for r in rows if r["status"] != "ok"]
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
        ("sail.diffusion_dpo step", "bf16"), ("sail.diffusion_dpo step", "bf16"),
        ("reference in its own dtype vs under autocast", "bf16"),
        ("reference in its own dtype vs under autocast", "fp16")]
    batch = f"{bench.TOY_SIZES['dpo_pairs']} pairs/step"
    assert [r["setting"] for r in part2[:6]] == [batch] * 3 + [f"{batch}, 5 steps per call"] + [batch] * 2
    assert int(part2[3]["units"]) == 5 * bench.TOY_SIZES["dpo_pairs"]
    assert ["no VAE" in r["note"] for r in part2[1:6]] == [True] * 3 + [False] * 2
    assert all("loss change" in r["note"] and r["value"] != "" for r in part2[6:])
    # part 3: one row per judge and move of theta, each with its spread and the real one
    part3 = [r for r in rows if r["part"] == "3"]
    assert [r["measure"] for r in part3] == [
        f"Eq. 8 spread, judge {judge}" for judge in ("fp32", "fp16", "bf16")] * 2
    assert ["at 1 x lr" in r["setting"] for r in part3] == [True] * 3 + [False] * 3
    # the fp32 judge is the truth: no error against itself
    assert float(part3[0]["value"]) == 0 and float(part3[3]["value"]) == 0
    assert all("real spread" in r["note"] and "changed vs fp32" in r["note"] for r in part3)
    # part 5: a FLUX-shaped LoRA stage (its own test below), then part 4: SDXL with and without
    # gradient checkpointing, then LoRA (with peft)
    assert len([r for r in rows if r["part"] == "5"]) == (3 if HAS_PEFT else 1)
    part4 = [r["measure"] for r in rows if r["part"] == "4" and r["per_second"]]
    assert len(part4) == 2 + HAS_PEFT and ("LoRA" in part4[-1]) == HAS_PEFT
    # part 6: generation per call size and precision, channels-last, torch.compile; ranking
    part6 = [(r["measure"], r["precision"], r["setting"]) for r in rows if r["part"] == "6"]
    calls = bench.TOY_SIZES["rate_calls"].split(",")
    assert part6[:2 * len(calls) + 2] == [
        ("generation", precision, f"{size} images per call, autocast")
        for precision in ("bf16", "fp16") for size in calls] + [
        ("generation", "bf16", f"{calls[-1]} images per call, {option}")
        for option in ("channels-last", "torch.compile")]
    assert part6[2 * len(calls) + 2][0] == "torch.compile's compile time"
    assert [(m, p) for m, p, _ in part6[-6:]] == [("ranking (Eq. 8)", f"judge {j}")
                                                  for j in ("fp32", "fp16") for _ in range(3)]
    # summary.json: every figure the issue names, the projection computed from them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["toy"] is True
    for name in ("dpo_vs_official", "dpo_memory_vs_official", "generation_images_per_s",
                 "ranking_fp32_images_per_s", "ranking_fp16_images_per_s", "paper_iteration_hours"):
        assert summary[name] > 0, name
    assert summary["paper_iteration_hours"] == pytest.approx(
        (80_000 / summary["generation_images_per_s"] + 80_000 / summary["ranking_fp32_images_per_s"]
         + 40_000 / summary["dpo_pairs_per_s"]) / 3600)
    text = (out / "results.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 6.", "/ official: pairs/s", "summary.json"):
        assert heading in text
    assert "part 4: SDXL-shaped pipeline built" in (out / "log").read_text()


@pytest.mark.optional  # peft: part 4's LoRA row
def test_gpu_figures_records_out_of_memory_and_the_time_budget(tmp_path, monkeypatch):
    import bench
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(sail, "diffusion_dpo", out_of_memory)
    out = tmp_path / "oom"
    assert bench.main(["--gpu-figures", "--toy", "--parts", "1,4", "--precisions", "bf16",
                       "--out", str(out)]) == 0
    rows = figure_rows(out)
    assert [r["status"] for r in rows if r["part"] == "4"][:2 + HAS_PEFT] == ["OOM"] * (2 + HAS_PEFT)
    # part 1: the stage that ran out is a row, and so is the run it stopped
    part1 = {r["measure"]: r["status"] for r in rows if r["part"] == "1"}
    assert part1["DPO iter_0"] == part1["whole run (sail.main)"] == part1["whole run"] == "OOM"
    monkeypatch.undo()
    out = tmp_path / "budget"
    assert bench.main(["--gpu-figures", "--toy", "--parts", "2,3", "--budget-s", "1",
                       "--out", str(out)]) == 0
    assert [r["status"].split(":")[0] for r in figure_rows(out) if r["part"] in ("2", "3")] == [
        "skipped", "skipped"]


@pytest.mark.optional  # peft: LoRA
def test_gpu_figures_toy_part_5_measures_a_flux_lora_stage(tmp_path):
    """Part 5 alone: a FLUX-shaped LoRA stage's DPO step, generation and Eq. 8, each a row with
    its peak memory, and its table in results.md."""
    import bench
    out = tmp_path / "flux"
    assert bench.main(["--gpu-figures", "--toy", "--parts", "5", "--out", str(out)]) == 0
    rows = [r for r in figure_rows(out) if r["part"] == "5"]
    if not HAS_PEFT:
        assert [r["status"].split(":")[0] for r in rows] == ["skipped"]
        return
    assert [r["measure"].split(":")[1].split(",")[0].strip() for r in rows] == [
        "DPO step", "generation", "Eq. 8 in fp32 layer by layer"]
    assert all(r["status"] == "ok" and float(r["peak_gib"]) > 0 for r in rows)
    assert "## 5. A FLUX.1-shaped LoRA stage" in (out / "results.md").read_text()


def test_cache_gain_times_the_same_step_with_posteriors_encoded_and_kept(tmp_path):
    import bench
    out = tmp_path / "gain"
    assert bench.main(["--cache-gain", "--quick", "--resolution", "16", "--pairs", "2",
                       "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "| encoded in the step |" in text and "| kept (--cache-posteriors) |" in text
    assert "x the pairs/s of encoding in the step" in text
