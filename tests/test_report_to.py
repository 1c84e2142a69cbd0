"""--report-to: the live curves show what metrics.jsonl records, read back with TensorBoard's own
reader. Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_report_to.py (about 20 s, 2 CPUs).
"""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sail

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = ["--tiny", "--iters", "1", "--dpo-steps", "2", "--n-candidates", "3", "--k-draws", "2",
            "--prompts-per-iter", "4", "--sample-steps", "2", "--eval-seeds", "1"]
NO_TENSORBOARD = "tensorboard is not installed (optional: --report-to tensorboard; pip install tensorboard)"


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch, tmp_path):
    """sail.py's default files are relative to the repository; the Pick-a-Pic cache stays here."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SAIL_CACHE", str(tmp_path / "cache"))


def read_events(folder):
    """One TensorBoard run folder -> ({tag: [(step, value)]}, {tag: [(step, pixels)]})."""
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason=NO_TENSORBOARD)
    events = reader.EventAccumulator(str(folder), size_guidance={reader.SCALARS: 0,
                                                                 reader.IMAGES: 0}).Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                    for e in events.Images(tag)] for tag in tags["images"]}
    return scalars, images


def expected_curves(out):
    """What metrics.jsonl says each TensorBoard run must show: {part: {name: [(x, value)]}} with
    x = DPO steps taken so far in the run (a summary: at its stage's last step), and each stage's
    x for its grid."""
    curves, grid_at, taken = {"steps": {}, "stages": {}}, {}, 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        summary = record.get("event") == "summary"
        taken += not summary  # an uninterrupted log: steps 1, 2, ... of each stage in order
        if summary:
            grid_at[record["stage"]] = taken
        for name, value in record.items():
            if name not in ("stage", "event", "step"):
                assert isinstance(value, (int, float)), (name, value)  # every other field is a metric
                curves["stages" if summary else "steps"].setdefault(name, []).append((taken, value))
    return curves, grid_at


def assert_tensorboard_shows_metrics_jsonl(out):
    curves, grid_at = expected_curves(out)
    for part, expected in curves.items():
        scalars, images = read_events(out / "tensorboard" / part)
        assert scalars.keys() == expected.keys()  # metrics.jsonl's names, none more, none less
        for name, points in expected.items():
            assert [x for x, _ in scalars[name]] == [x for x, _ in points], name  # once each
            assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in points],
                                                                  rel=1e-6, abs=1e-30), name
    assert images.keys() == {f"grid/{stage}" for stage in grid_at}  # images: the stages' run
    for stage, x in grid_at.items():
        [(step, pixels)] = images[f"grid/{stage}"]
        assert step == x
        assert np.array_equal(pixels, np.asarray(Image.open(out / stage / "grid.png").convert("RGB")))


def test_tensorboard_shows_every_metric_of_metrics_jsonl_and_each_stage_grid(tmp_path):
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    out = tmp_path / "run"
    assert sail.main([*TINY_RUN, "--report-to", "tensorboard", "--out", str(out)]) == 0
    _, grid_at = expected_curves(out)
    assert list(grid_at) == ["base", "iter_0", "iter_1"] and list(grid_at.values()) == [0, 2, 4]
    grids = {(out / stage / "grid.png").read_bytes() for stage in grid_at}
    assert len(grids) == 3  # the stages' grids differ: a grid sent for the wrong stage shows
    assert_tensorboard_shows_metrics_jsonl(out)


class Crash(Exception):
    """Stands for a kill: the run stops where it is."""


def test_a_resumed_run_continues_its_curves_showing_each_step_once(tmp_path, monkeypatch):
    """Killed at iter_1's 4th DPO step, 1 step after its checkpoint: the resumed run sends step 3
    again. TensorBoard shows each step once and the curves go on where they stopped."""
    pytest.importorskip("tensorboard", reason=NO_TENSORBOARD)
    out, real, calls = tmp_path / "run", sail.dpo_loss, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 8:  # one call per step; iter_0 took 4 steps
            raise Crash
        return real(*args)
    flags = [*TINY_RUN[:3], "--dpo-steps", "4", "--checkpoint-every", "2", *TINY_RUN[5:]]
    with monkeypatch.context() as patched, pytest.raises(Crash):
        patched.setattr(sail, "dpo_loss", crashing)
        sail.main([*flags, "--report-to", "tensorboard", "--out", str(out)])
    scalars, _ = read_events(out / "tensorboard" / "steps")
    assert [x for x, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6, 7]  # sent before the kill
    assert sail.main(["--resume", str(out)]) == 0  # --report-to comes from config.json
    assert_tensorboard_shows_metrics_jsonl(out)
    assert [x for x, _ in read_events(out / "tensorboard" / "steps")[0]["loss"]] == list(range(1, 9))


@pytest.mark.parametrize("kind, module", [("wandb", "wandb"), ("trackio", "trackio"),
                                          ("tensorboard", "torch.utils.tensorboard")])
def test_report_to_a_missing_package_exits_2_naming_it_and_writes_nothing(tmp_path, capsys,
                                                                           monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    out = tmp_path / "run"
    assert sail.main([*TINY_RUN, "--report-to", kind, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --report-to {kind} needs the {kind} package: pip install {kind}"]
    assert not out.exists()
