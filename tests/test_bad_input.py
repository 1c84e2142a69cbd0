"""Bad input: one line naming the file, the entry and the problem; exit 2; earlier output untouched."""

import json
import shutil

import pytest

import sail
from conftest import HERE, TINY_DATA


def test_an_unknown_flag_is_named_with_the_closest_one_exit_2(capsys):
    assert sail.main(["--itrs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown flag --itrs (did you mean --iters?); python sail.py --help "
                   "lists every flag"]


def write_pairs(tmp_path, content):
    path = tmp_path / "pairs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    shutil.copytree(HERE / "seed_images", tmp_path / "seed_images")
    return path


GOOD = {"prompt": "a red circle", "chosen": "seed_images/000_chosen.png",
        "rejected": "seed_images/000_rejected.png"}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ([], "non-empty JSON list"),
    ([GOOD, {"prompt": "a red circle", "chosen": "seed_images/000_chosen.png"}],
     "entry 1: key 'rejected' missing"),
    ([{**GOOD, "chosen": "seed_images/nope.png"}], "entry 0: chosen image seed_images/nope.png missing"),
    ([{**GOOD, "rejected": "broken.png"}], "entry 0: rejected image broken.png missing or unreadable"),
    ([{**GOOD, "prompt": "a pink dog"}], "entry 0: 'a pink dog' is not a tiny-world prompt"),
])
def test_bad_seed_pairs_file(tmp_path, earlier_run, capsys, content, message):
    path = write_pairs(tmp_path, content)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = sail.main(["--tiny", "--seed-pairs", str(path), "--out", str(earlier_run)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and message in err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("text, message", [
    ("", "no prompts"),
    ("# only a comment\n\n   \n", "no prompts"),
    ("a red circle\na blue square\n", "2 prompts to train on, but 2 iterations x 18 prompts need 36"),
])
def test_bad_prompts_file(tmp_path, earlier_run, capsys, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    code = sail.main(["--tiny", "--iters", "2", "--prompts", str(path), "--out", str(earlier_run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(path) in err and message in err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.parametrize("flags, message", [
    (["--n-candidates", "1"], "--n-candidates (N) must be >= 2"),
    (["--k-draws", "0"], "--k-draws (K) must be >= 1"),
    (["--mix-alpha", "0"], "--mix-alpha must be in (0, 1]"),
    (["--mix-alpha", "1.5"], "--mix-alpha must be in (0, 1]"),
    (["--iters", "-1"], "--iters must be >= 0"),
    (["--effective-batch", "10", "--micro-batch", "4"], "multiple of --micro-batch"),
])
def test_bad_flag_values(earlier_run, capsys, flags, message):
    code = sail.main(["--tiny", "--out", str(earlier_run), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in earlier_run.iterdir()) == ["metrics.jsonl"]


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sail.main(["--tiny", "--pairs", "sideways"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_existing_output_folder_is_never_overwritten(earlier_run, capsys):
    code = sail.main(["--tiny", "--out", str(earlier_run)])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (earlier_run / "metrics.jsonl").read_text() == "precious\n"


def test_unloadable_model_says_so_in_one_line_and_names_tiny(tmp_path, capsys):
    code = sail.main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "could not load --model" in err and "--tiny" in err
    assert not (tmp_path / "o").exists()


def test_a_local_model_folder_names_the_part_or_file_that_failed(tmp_path, capsys, tiny_base):
    """A local folder is no network problem: the error names what is missing or corrupt."""
    for broken, message in [("unet", "model_index.json lists unet (UNet2DConditionModel), but "),
                            ("unet/diffusion_pytorch_model.safetensors",
                             "diffusion_pytorch_model.safetensors: ")]:
        model = tmp_path / broken.replace("/", "-")
        shutil.copytree(tiny_base, model)
        if broken == "unet":
            shutil.rmtree(model / "unet")
        else:
            (model / broken).write_bytes((model / broken).read_bytes()[:100])  # cut short
        code = sail.main(["--model", str(model), *TINY_DATA, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert "--tiny" not in err and not (tmp_path / "o").exists()


def test_unsupported_pipeline_class_is_named(tmp_path, capsys, tiny_base):
    model = tmp_path / "other"
    shutil.copytree(tiny_base, model)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    code = sail.main(["--model", str(model), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "StableDiffusionImg2ImgPipeline is not supported" in err
