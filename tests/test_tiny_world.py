"""The tiny world: images, annotator, tokenizer, the shipped base and pairs rebuilt."""

import shutil

import torch
from diffusers import StableDiffusionPipeline

import plumbing
import tiny_world
from conftest import HERE

# -------------------------------------------------------------------------------------------------
# The tiny world
# -------------------------------------------------------------------------------------------------

def test_tiny_world_images_show_their_prompt_and_the_annotator_prefers_big_bright_centred():
    prompts = [p for p in tiny_world.PROMPTS for _ in range(10)]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    assert images.shape == (180, 3, 16, 16)
    assert tiny_world.fidelity(images, prompts).float().mean() > 0.9
    big = torch.zeros(1, 3, 16, 16)
    big[:, 0, 3:13, 3:13] = 1.0
    small = torch.zeros(1, 3, 16, 16)
    small[:, 0, 0:4, 0:4] = 0.6
    assert tiny_world.annotator_score(big, ["a red square"]) > tiny_world.annotator_score(small, ["a red square"])
    assert tiny_world.annotator_score(big, ["a blue square"]) < 1  # wrong colour earns nothing
    blob = torch.ones(1, 3, 16, 16) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    assert not tiny_world.fidelity(blob, ["a red square"])[0]  # a screen of paint is not a square


def test_seed_pairs_command_rebuilds_the_shipped_pairs_bit_identical(tmp_path, capsys):
    assert tiny_world.main(["seed-pairs", "--out", str(tmp_path / "pairs")]) == 0
    assert "the seed and held-out pairs: bit-identical to the shipped" in capsys.readouterr().out
    assert tiny_world.main(["seed-pairs", "--out", str(tmp_path / "pairs")]) == 2  # never overwrites


def test_shipped_tiny_base_comparison_names_a_changed_weight(tmp_path):
    from safetensors.torch import load_file, save_file
    copy_of = tmp_path / "base"
    shutil.copytree(tiny_world.BASE, copy_of)
    assert tiny_world.differences(copy_of, tiny_world.BASE) == []
    weights = copy_of / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    found = tiny_world.differences(copy_of, tiny_world.BASE)
    assert len(found) == 1 and "unet/diffusion_pytorch_model.safetensors" in found[0] and "0.001" in found[0]


def test_pretrain_command_writes_a_loadable_tiny_base(tmp_path, capsys):
    assert tiny_world.main(["pretrain", "--steps", "2", "--out", str(tmp_path / "base")]) == 0
    assert "pretrained the tiny base" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the world's latents
    assert sorted(p.name for p in (tmp_path / "base" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_tiny_tokenizer_gives_one_token_per_word(tmp_path):
    tokenizer = tiny_world.tokenizer(tmp_path)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a magenta triangle").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "magenta</w>", "triangle</w>", "<|endoftext|>"]


def test_shipped_seed_pairs_are_annotator_labelled_on_seen_prompts_only():
    pairs = plumbing.read_seed_pairs(HERE / "seed_pairs.json")
    assert len(pairs) == tiny_world.N_SEED_PAIRS
    assert {p["prompt"] for p in pairs} == set(tiny_world.SEEN)
    prompts = [p["prompt"] for p in pairs]
    chosen = torch.stack([plumbing.load_image(p["chosen"], 16) for p in pairs]) / 2 + 0.5
    rejected = torch.stack([plumbing.load_image(p["rejected"], 16) for p in pairs]) / 2 + 0.5
    assert torch.all(tiny_world.annotator_score(chosen, prompts) > tiny_world.annotator_score(rejected, prompts))
