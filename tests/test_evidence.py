"""The evidence study: its controls, its quick size, the verdict rule, the variant worlds."""

import csv
import json
import shutil

import pytest
import torch

import plumbing
import sail
import tiny_world
from conftest import HAS_MATPLOTLIB, HERE

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
    # an image keeps its latents and its starting noise (--pair-noise prior) when a pair flips
    files = [{**p, **{f"{k}_{kind}": f"{p[k]}.{kind}" for k in ("chosen", "rejected")
                      for kind in ("latents", "noise")}} for p in swapped]
    for pair in tiny_world.annotator_relabel(files):
        assert all(pair[f"{k}_{kind}"] == f"{pair[k]}.{kind}" for k in ("chosen", "rejected")
                   for kind in ("latents", "noise"))


def test_oracle_labels_need_the_tiny_world(tmp_path, tiny_base, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_base, model)
    code = sail.main(["--model", str(model), "--oracle-labels", "--out", str(tmp_path / "o")])
    assert code == 2 and "--oracle-labels needs the tiny world" in capsys.readouterr().err


@pytest.mark.optional  # matplotlib: the plot
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


def test_evidence_in_the_flow_world_runs_prior_noise_pairs(tmp_path):
    """--tiny-model flow: every run on the flow base, SAIL with --pair-noise prior as a condition
    and its claim (prior noise beats fresh noise: SAIL minus it expected negative)."""
    import evidence
    out = tmp_path / "flow"
    assert evidence.main(["--quick", "--tiny-model", "flow", "--seeds", "1", "--out", str(out),
                          "--conditions", "sail,sail-prior-noise"]) == 0
    configs = [json.loads((out / "runs" / f"{c}-seed0" / "config.json").read_text())
               for c in ("sail", "sail-prior-noise")]
    assert [(c["tiny_model"], c["pair_noise"]) for c in configs] == [("flow", "fresh"),
                                                                     ("flow", "prior")]
    pairs = json.loads((out / "runs" / "sail-prior-noise-seed0" / "iter_1" / "pairs.json").read_text())
    assert pairs and all("chosen_noise" in p for p in pairs)
    text = (out / "results.md").read_text()
    assert "Tiny world 'shapes' (flow)" in text and "prior-noise pairs (PNAPO) beat fresh noise" in text
    assert evidence.FLOW_CONDITIONS == ["single-round-seed-dpo", "iterative-seed-dpo", "sail",
                                        "sail-prior-noise"]


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


# -------------------------------------------------------------------------------------------------
# The second evidence study: two variant worlds, each one change to the tiny world
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
