"""Real data: the held-out split, evaluation prompts, the default Pick-a-Pic data and its importer."""

import json
from pathlib import Path

import pytest
from PIL import Image

import plumbing
import sail
from conftest import (REAL_QUICK, TINY_DATA, argparse_like, pickapic_rows, records,
                      write_pickapic_shard)


def test_held_out_pairs_are_a_fixed_five_percent_never_trained_on():
    pairs = [{"prompt": f"p{i}"} for i in range(400)]
    args = argparse_like(heldout_pairs=None, seed=0)
    train, held, why = plumbing.split_heldout(pairs, args)
    assert len(held) == 20 and len(train) == 380 and why == ""
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    assert plumbing.split_heldout(pairs, args) == (train, held, "")  # seeded: the same every run
    assert len(plumbing.split_heldout(pairs * 30, args)[1]) == 500  # at most 500
    # below 20 held-out pairs (fewer than 400 seed pairs) a judge moves in coarse steps: none
    train, held, why = plumbing.split_heldout(pairs[:399], args)
    assert (train, held) == (pairs[:399], []) and why.startswith("5% of 399 seed pairs is 19")


def test_a_run_without_a_held_out_judge_says_why_in_its_second_line(tmp_path, tiny_base, capsys):
    """The shipped 64 seed pairs as a real model's data: 5% is 3 pairs, so no judge, one line why."""
    assert sail.main(["--model", tiny_base, *TINY_DATA, *REAL_QUICK, "--dpo-steps", "1",
                      "--out", str(tmp_path / "run")]) == 0
    second = capsys.readouterr().out.splitlines()[1]
    assert "no held-out judge: 5% of 64 seed pairs is 3, below the 20 a judge needs" in second
    summaries = [r for r in records(tmp_path / "run") if r.get("event") == "summary"]
    assert not any("judge_acc/heldout" in r for r in summaries)


def test_real_models_evaluate_on_prompts_no_stage_trains_on():
    seed = [{"prompt": "a"}, {"prompt": "b"}]
    prompts = ["a", "c", "d", "e", "f", "g", "b", "h"]
    args = argparse_like(tiny=False, prompts="prompts.txt")
    train, held = plumbing.split_eval_prompts(prompts, seed, args)
    assert held == ["e", "f", "g", "h"] and train == ["a", "c", "d", "b"]
    with pytest.raises(sail.InputError, match="none is left to evaluate on"):
        plumbing.split_eval_prompts(["a", "b"], seed, args)


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


def test_the_first_line_calls_a_short_default_job_a_check_and_a_paper_sized_one_not(tiny_base):
    """Its step counts: step 0 on the seed pairs less the held-out ones (5%, at most 500), an
    iteration on at most its prompts / alpha pairs, each over the effective batch of 128."""
    small = plumbing.default_job(sail.parse_args(["--model", tiny_base]))
    assert small == ("; default data: 1000 Pick-a-Pic v2 pairs, 100 new prompts per iteration; "
                     "Diffusion-DPO: 8 steps in step 0, at most 4 per iteration, lr 1.28e-06: a "
                     "check of the whole real path, not an alignment (README, Quickstart: a run "
                     "that aligns)")
    paper = plumbing.default_job(sail.parse_args(["--model", tiny_base, "--pickapic-pairs", "50000",
                                                  "--prompts-per-iter", "10000"]))
    assert paper.endswith("387 steps in step 0, at most 313 per iteration, lr 1.28e-06")
    assert plumbing.default_job(sail.parse_args(["--model", tiny_base, *TINY_DATA])) == ""
