"""sail.py's default data for a real model: a Pick-a-Pic v2 subset read from the data set's own
parquet shards (pickapic.default_subset), from a folder of them or downloaded from the hub.

Each test writes small shards with Pick-a-Pic's columns; the hub is huggingface_hub monkeypatched
to serve them. No network: the hub is offline here (conftest.py), as everywhere in the suite.
"""

import io
import os
import json
from pathlib import Path

import huggingface_hub
import pytest
from PIL import Image

import pickapic
import plumbing
import sail
import tiny_world
from conftest import png_bytes, write_pickapic_shard

HUB_NAME = "yuvalkirstain/pickapic_v2"
QUICK = ["--dpo-steps", "3", "--n-candidates", "3", "--k-draws", "2", "--prompts-per-iter", "4",
         "--eval-seeds", "1", "--iters", "1", "--resolution", "16", "--sample-steps", "2",
         "--effective-batch", "4", "--micro-batch", "2", "--generation-batch", "6"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The subset cache goes to the test's own folder, never the user's ~/.cache/sail."""
    monkeypatch.setenv("SAIL_CACHE", str(tmp_path / "sail-cache"))


def write_shards(folder, n_shards, n_rows, split="train"):
    """Shards named as on the hub (data/train-00000-of-00645-<hash>.parquet). Row i of shard s:
    caption "<split> s i//2" (two pairs a prompt, as Pick-a-Pic has several), label_0 wins on even
    i, label_1 on odd i, every 5th row a tie; jpg_0 has colour (i+1, s, 0), jpg_1 (0, s, i+1).
    Returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for s in range(n_shards):
        rows = [(f"{split} {s} {i // 2}", png_bytes((i + 1, s, 0)), png_bytes((0, s, i + 1)),
                 *((0.5, 0.5) if i % 5 == 4 else (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)))
                for i in range(n_rows)]
        names.append(f"{split}-{s:05d}-of-{n_shards:05d}-{s:016x}.parquet")
        write_pickapic_shard(folder / names[-1], rows)
    return names


def shard_and_row(image_bytes):
    """(s, i) of the shard row an image of write_shards came from, read from its colour."""
    red, s, blue = Image.open(io.BytesIO(image_bytes)).getpixel((0, 0))
    return s, max(red, blue) - 1


def subset(folder):
    """A written subset: its seed pairs with their image bytes, and its prompts."""
    pairs = plumbing.read_seed_pairs(folder / "seed_pairs.json")
    return ([(p["prompt"], Path(p["chosen"]).name, Path(p["chosen"]).read_bytes(),
              Path(p["rejected"]).read_bytes()) for p in pairs],
            plumbing.read_prompts(folder / "prompts.txt"))


def test_a_real_model_without_data_flags_trains_on_a_subset_of_local_parquet_shards(
        tmp_path, capsys, monkeypatch):
    folder = tmp_path / "pickapic_v2"  # as `huggingface-cli download` leaves it: shards in data/
    write_shards(folder / "data", n_shards=3, n_rows=20)
    write_shards(folder / "data", n_shards=1, n_rows=20, split="train_unique")  # not train-*
    flags = ["--model", str(tiny_world.BASE), "--pickapic-dataset", str(folder), *QUICK,
             "--pickapic-pairs", "8"]
    assert sail.main([*flags, "--out", str(tmp_path / "one")]) == 0
    first = capsys.readouterr().out.splitlines()[0]  # says what the job is: a check, its sizes
    assert first.endswith("; default data: 8 Pick-a-Pic v2 pairs, 4 new prompts per iteration; "
                          "Diffusion-DPO: 3 steps in step 0, at most 3 per iteration, lr 4e-08: "
                          "a check of the whole real path, not an alignment (README, Quickstart: a "
                          "run that aligns)"), first
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    seed_pairs = plumbing.read_seed_pairs(config["seed_pairs"])
    prompts = plumbing.read_prompts(config["prompts"])
    assert len(seed_pairs) == 8 and len(prompts) == 1 * 4 + plumbing.EVAL_PROMPTS
    assert all(text.startswith("train ") for text in [p["prompt"] for p in seed_pairs] + prompts)
    assert not {p["prompt"] for p in seed_pairs} & set(prompts)  # prompts are other captions...
    assert len(set(prompts)) == len(prompts)  # ...each once
    for pair in seed_pairs:
        s, i = shard_and_row(Path(pair["chosen"]).read_bytes())
        assert shard_and_row(Path(pair["rejected"]).read_bytes()) == (s, i)  # one row's images
        assert pair["prompt"] == f"train {s} {i // 2}" and i % 5 != 4  # its caption; no tie
        chosen = Image.open(pair["chosen"]).getpixel((0, 0))
        assert chosen == ((i + 1, s, 0) if i % 2 == 0 else (0, s, i + 1))  # jpg_0 wins on even i

    def read_a_shard(*_):
        raise AssertionError("the second run read a shard")
    monkeypatch.setattr(pickapic, "shuffled_rows", read_a_shard)  # the cache is all it reads
    assert sail.main([*flags, "--out", str(tmp_path / "two")]) == 0
    second = json.loads((tmp_path / "two" / "config.json").read_text())
    assert second["seed_pairs"] == config["seed_pairs"]


def test_hub_shards_are_downloaded_in_a_seeded_order_and_only_those_needed(tmp_path, monkeypatch):
    local = tmp_path / "shards"  # a flat folder of the same shards the hub serves
    names = write_shards(local, n_shards=6, n_rows=10)
    write_shards(local, n_shards=1, n_rows=10, split="train_unique")  # not train-*: never read
    listing = [".gitattributes", "README.md", *(f"data/{n}" for n in sorted(os.listdir(local)))]
    downloads = []

    def list_repo_files(self, repo_id, repo_type=None):
        assert (repo_id, repo_type) == (HUB_NAME, "dataset")
        return listing

    def hf_hub_download(repo_id, filename, repo_type=None):
        assert (repo_id, repo_type) == (HUB_NAME, "dataset")
        downloads.append(Path(filename).name)
        return str(local / Path(filename).name)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    for dataset in (HUB_NAME, str(local)):  # this split's shards only, never train_unique-*
        assert [name for name, _ in pickapic.shard_files(dataset, "train")] == names
    pickapic.default_subset(HUB_NAME, tmp_path / "hub", n_pairs=8, n_prompts=8)
    pickapic.default_subset(str(local), tmp_path / "folder", n_pairs=8, n_prompts=8)
    assert subset(tmp_path / "hub") == subset(tmp_path / "folder")  # one subset, either source
    pairs, prompts = subset(tmp_path / "hub")
    shard_of = {f"train {s} {i // 2}": name for s, name in enumerate(names) for i in range(10)}
    used = [shard_of[text] for text in [pair[0] for pair in pairs] + prompts]
    # only the shards needed, each downloaded once, in the order the subset reads them
    assert downloads == list(dict.fromkeys(used)) and 1 < len(downloads) < len(names)
    assert downloads != names[:len(downloads)]  # the shards are shuffled...
    rows = [shard_and_row(pair[2])[1] for pair in pairs if shard_of[pair[0]] == downloads[0]]
    assert len(rows) > 2 and rows != sorted(rows)  # ...and so are the rows within a shard

    seed_0, downloads[:] = list(downloads), []  # the order is the seed's
    pickapic.default_subset(HUB_NAME, tmp_path / "seed-1", n_pairs=8, n_prompts=8, seed=1)
    assert downloads != seed_0 and subset(tmp_path / "seed-1") != (pairs, prompts)


def test_offline_with_nothing_cached_exits_2_naming_the_dataset_and_both_fixes(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert sail.main(["--model", str(tiny_world.BASE), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and HUB_NAME in err[0]
    assert "allow the download once" in err[0] and "--seed-pairs and --prompts" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "sail-cache").exists()
