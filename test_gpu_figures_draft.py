"""Draft tests for bench.py --gpu-figures (issue 17), to be merged into test_sail.py.

They run the GPU mode's every code path on a CPU at toy sizes, so that a typo cannot waste GPU
time: python -m pytest -q test_gpu_figures_draft.py
"""

import csv
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing network must not hang a local load

import torch  # noqa: E402

import bench  # noqa: E402
import sail  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def run_from_the_repository(monkeypatch):
    monkeypatch.chdir(HERE)


def figure_rows(out):
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_gpu_figures_toy_writes_every_row_of_every_part(tmp_path):
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
