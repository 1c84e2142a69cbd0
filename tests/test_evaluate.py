"""evaluate.py: the annotator, PickScore, the aesthetic score, ImageReward, HPS, intervals, win rates."""

import csv
import json
import math
import shutil

import pytest
import torch

import plumbing
import tiny_world
from conftest import png_bytes, write_pickapic_shard


def test_pickscore_is_scaled_cosine_of_clip_embeddings(tiny_pickscore):
    import evaluate
    scorer = evaluate.PickScore(tiny_pickscore / "model", tiny_pickscore / "processor",
                                torch.device("cpu"))
    images = tiny_world.draw_images(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    scores = scorer(images, prompts)
    # independent: CLIPModel's own forward gives logits_per_image = logit_scale.exp() * cos
    inputs = scorer.processor(text=prompts, images=[plumbing.to_pil(i) for i in images],
                              padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**inputs).logits_per_image                      # (images, texts)
    torch.testing.assert_close(scores, logits.diagonal())
    assert scorer.model.logit_scale.exp().item() == pytest.approx(math.exp(3.0))


@pytest.fixture(scope="session")
def tiny_aesthetic(tiny_pickscore, tmp_path_factory):
    """A CLIP folder (model + processor, as openai/clip-vit-large-patch14 ships) and a random
    aesthetic head saved under improved-aesthetic-predictor's key names."""
    folder = tmp_path_factory.mktemp("aesthetic")
    shutil.copytree(tiny_pickscore / "model", folder / "clip")
    for file in (tiny_pickscore / "processor").iterdir():
        shutil.copy(file, folder / "clip")
    torch.manual_seed(1)
    sizes = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        head[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(n_out)
    torch.save(head, folder / "head.pth")
    return folder


def test_aesthetic_score_is_the_linear_mlp_of_the_normalised_image_embedding(tiny_aesthetic):
    import evaluate
    scorer = evaluate.Aesthetic(tiny_aesthetic / "clip", tiny_aesthetic / "head.pth",
                                torch.device("cpu"))
    images = tiny_world.draw_images(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    scores = scorer(images, ["a red circle", "a blue square"])
    # independent: CLIP's vision tower + projection by hand, then the head's five affine maps
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images], return_tensors="pt")
    with torch.no_grad():
        pooled = scorer.model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        x = scorer.model.visual_projection(pooled)                               # (2, 16)
    x = x / x.norm(dim=-1, keepdim=True)
    head = torch.load(tiny_aesthetic / "head.pth", weights_only=True)
    for index in (0, 2, 4, 6, 7):
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(-1))


def test_evaluate_scores_every_stage_of_a_run(uninterrupted, tiny_pickscore, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    code = evaluate.main([str(uninterrupted), "--seeds", "2", "--metrics", "annotator,pickscore",
                          "--pickscore-model", str(tiny_pickscore / "model"),
                          "--pickscore-processor", str(tiny_pickscore / "processor"),
                          "--out", str(out)])
    assert code == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["base", "iter_0", "iter_1"]
    assert {"annotator", "annotator low", "annotator/seen", "annotator/unseen", "fidelity",
            "pickscore", "pickscore high", "pickscore win"} <= set(rows[0])
    assert all(r["prompts"] == "18" and r["images"] == "36" for r in rows)
    assert "| model | annotator | annotator win vs base |" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "clipscore"], "unknown metric(s) clipscore"),
    (["--models", "iter_9"], "iter_9 not in"),
    (["--metrics", "pickscore", "--pickscore-model", "/no/such/model"], "cannot load the PickScore"),
    (["--metrics", "aesthetic"], "--metrics aesthetic needs --aesthetic-head"),
    (["--metrics", "aesthetic", "--aesthetic-head", "/no/such.pth"], "cannot load the aesthetic"),
])
def test_evaluate_bad_input(uninterrupted, capsys, tmp_path, argv, message):
    import evaluate
    code = evaluate.main([str(uninterrupted), *argv, "--out", str(tmp_path / "e")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    import evaluate
    assert evaluate.main([str(tmp_path)]) == 2
    assert "not a sail.py run folder" in capsys.readouterr().err


# Bootstrap intervals over prompts and win rates against the base, by hand

def test_bootstrap_interval_of_two_prompts_is_their_range_and_holds_the_mean():
    import evaluate
    # 2 prompts scoring 0 and 1: a resample's mean is 0, 0.5 or 1 with odds 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% quantiles of 1000 resampled means are 0 and 1
    assert evaluate.mean_and_interval(torch.tensor([0.0, 1.0])) == (0.5, 0.0, 1.0)
    assert evaluate.mean_and_interval(torch.full((7,), 3.0)) == (3.0, 3.0, 3.0)


def test_bootstrap_interval_matches_the_normal_approximation_and_shrinks_with_more_prompts():
    import evaluate
    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 2 + 5
    widths = []
    for n in (50, 2000):
        mean, low, high = evaluate.mean_and_interval(values[:n])
        assert low < mean < high and mean == pytest.approx(values[:n].double().mean().item())
        # independent: mean +- 1.96 s / sqrt(n) for a mean of n draws
        half = 1.96 * values[:n].double().std().item() / math.sqrt(n)
        assert (high - low) / 2 == pytest.approx(half, rel=0.15)
        widths.append(high - low)
    assert widths[1] < widths[0] / 4  # sqrt(2000 / 50) = 6.3 times narrower in theory


def test_win_rate_counts_ties_half_and_a_model_against_itself_wins_half():
    import evaluate
    model = torch.tensor([[1.0, 2.0], [3.0, 3.0]])  # (prompts, seeds)
    base = torch.tensor([[0.0, 2.0], [4.0, 1.0]])
    # prompt 0: a win and a tie -> 0.75; prompt 1: a loss and a win -> 0.5
    assert evaluate.wins(model, base).tolist() == [0.75, 0.5]
    assert evaluate.wins(base, model).tolist() == [0.25, 0.5]
    assert evaluate.wins(model, model).tolist() == [0.5, 0.5]


def test_evaluate_tables_give_intervals_and_win_rates_against_the_base(uninterrupted, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    assert evaluate.main([str(uninterrupted), "--seeds", "2", "--models", "iter_1",
                          "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["base", "iter_1"]  # the base is always scored
    for row in rows:
        for name in ("annotator", "annotator/seen", "annotator/unseen", "fidelity"):
            low, mean, high = (float(row[name + k]) for k in (" low", "", " high"))
            assert low <= mean <= high
            win = [float(row[name + " win" + k]) for k in (" low", "", " high")]
            assert 0 <= win[0] <= win[1] <= win[2] <= 1
    assert all(rows[0][f"annotator win{k}"] == "0.5" for k in ("", " low", " high"))
    # the stages differ, so iter_1 wins or loses some of its images against the base
    assert float(rows[1]["annotator win"]) != 0.5 and rows[1]["annotator"] != rows[0]["annotator"]
    table = (out / "results.md").read_text()
    assert "| model | annotator | annotator win vs base |" in table and "0.5 (itself)" in table


# Prompt sets: any prompt file, or Pick-a-Pic v2 captions through pickapic.py's reader

def test_evaluate_reads_pickapic_captions_as_prompts_unique_and_in_order(uninterrupted, tmp_path):
    import evaluate
    captions = ["a red circle", "a  blue square", "a red circle", "a green triangle"]
    write_pickapic_shard(tmp_path / "test_unique-0.parquet", [
        (caption, png_bytes((i, 0, 0)), png_bytes((0, i, 0)), 1.0, 0.0)
        for i, caption in enumerate(captions)])
    assert evaluate.pickapic_captions([tmp_path / "test_unique-0.parquet"], "test_unique") == [
        "a red circle", "a blue square", "a green triangle"]
    out = tmp_path / "eval"
    assert evaluate.main([str(uninterrupted), "--seeds", "1", "--models", "base", "--pickapic",
                          str(tmp_path / "test_unique-0.parquet"), "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        assert next(csv.DictReader(handle))["prompts"] == "3"


# ImageReward on a tiny BLIP, HPS on a tiny open_clip ViT, both saved in their official layouts
# and checked against a forward pass written out here from those layouts

def attend(q, k, v, heads, keep=None):
    """Multi-head scaled dot-product attention of projected (B, L, D) queries, keys, values."""
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, h, L, d)
    logits = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    out = logits.softmax(-1) @ split(v)                                        # (B, h, L, d)
    return out.transpose(1, 2).reshape(q.shape)


def layers(weights):
    linear = lambda x, name: x @ weights[name + ".weight"].T + weights[name + ".bias"]
    norm = lambda x, name, eps: torch.nn.functional.layer_norm(
        x, x.shape[-1:], weights[name + ".weight"], weights[name + ".bias"], eps)
    return linear, norm


def random_weights(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * (0.3 if len(shape) > 1 else 0.1)
            for name, shape in shapes.items()}


def mlp_head_shapes(prefix, size):
    sizes = [(size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    return {f"{prefix}{index}.{kind}": (n_out, n_in) if kind == "weight" else (n_out,)
            for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes) for kind in ("weight", "bias")}


IR_VISION, IR_TEXT, IR_DEPTH = 64, 32, 2  # BLIP's ViT: heads = width / 64; its BERT: 4 heads


@pytest.fixture(scope="session")
def tiny_imagereward(tmp_path_factory):
    """ImageReward.pt under BLIP's names (vit.py, med.py) and ImageReward's MLP, random; its
    med_config.json; a word-level bert tokenizer folder."""
    folder = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", *tiny_world.COLOURS, *tiny_world.SHAPES]
    (folder / "tokenizer").mkdir()  # the files of bert-base-uncased's tokenizer, our words
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    D, H, v = IR_VISION, IR_TEXT, "blip.visual_encoder."
    shapes = {v + "cls_token": (1, 1, D), v + "pos_embed": (1, 5, D),  # 16 px / patch 8: 4 + 1
              v + "patch_embed.proj.weight": (D, 3, 8, 8), v + "patch_embed.proj.bias": (D,),
              v + "norm.weight": (D,), v + "norm.bias": (D,)}
    for i in range(IR_DEPTH):
        for name, (n_out, n_in) in {"attn.qkv": (3 * D, D), "attn.proj": (D, D),
                                    "mlp.fc1": (4 * D, D), "mlp.fc2": (D, 4 * D)}.items():
            shapes[f"{v}blocks.{i}.{name}.weight"], shapes[f"{v}blocks.{i}.{name}.bias"] = (n_out, n_in), (n_out,)
        for name in ("norm1", "norm2"):
            shapes[f"{v}blocks.{i}.{name}.weight"] = shapes[f"{v}blocks.{i}.{name}.bias"] = (D,)
    t = "blip.text_encoder."
    shapes.update({t + "embeddings.word_embeddings.weight": (len(words), H),
                   t + "embeddings.position_embeddings.weight": (40, H),
                   t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,)})
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for name, (n_out, n_in) in {
                "attention.self.query": (H, H), "attention.self.key": (H, H),
                "attention.self.value": (H, H), "attention.output.dense": (H, H),
                "crossattention.self.query": (H, H), "crossattention.self.key": (H, D),
                "crossattention.self.value": (H, D), "crossattention.output.dense": (H, H),
                "intermediate.dense": (2 * H, H), "output.dense": (H, 2 * H)}.items():
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (n_out, n_in), (n_out,)
        for name in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (H,)
    shapes.update({"blip.vision_proj.weight": (16, D), **mlp_head_shapes("mlp.layers.", H)})
    weights = random_weights(shapes, seed=2)
    weights[t + "embeddings.position_ids"] = torch.arange(40)[None]  # med.py's buffer
    torch.save(weights, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps({  # med_config.json's keys, tiny sizes
        "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": H,
        "intermediate_size": 2 * H, "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
        "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2,
        "vocab_size": len(words), "encoder_width": D, "add_cross_attention": True}))
    return folder


def imagereward_by_hand(weights, pixels, ids, mask):
    """ImageReward.score written out from the official layout: BLIP's ViT (vit.py), BERT with
    cross-attention in encoder mode (med.py), the MLP, (r - mean) / std (ImageReward.py)."""
    linear, norm = layers(weights)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = torch.nn.functional.conv2d(pixels, weights[v + "patch_embed.proj.weight"],
                                   weights[v + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([weights[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + weights[v + "pos_embed"]                                             # (B, 5, D)
    for i in range(IR_DEPTH):
        b = f"{v}blocks.{i}."
        q, k, val = linear(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + linear(attend(q, k, val, IR_VISION // 64), b + "attn.proj")
        x = x + linear(torch.nn.functional.gelu(linear(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")),
                       b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)
    h = weights[t + "embeddings.word_embeddings.weight"][ids] + \
        weights[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = norm(h, t + "embeddings.LayerNorm", 1e-12)
    keep = mask.bool()[:, None, None, :]                                   # padding keys off
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        a = attend(linear(h, p + "attention.self.query"), linear(h, p + "attention.self.key"),
                   linear(h, p + "attention.self.value"), 4, keep)
        h = norm(linear(a, p + "attention.output.dense") + h, p + "attention.output.LayerNorm", 1e-12)
        c = attend(linear(h, p + "crossattention.self.query"), linear(image, p + "crossattention.self.key"),
                   linear(image, p + "crossattention.self.value"), 4)
        h = norm(linear(c, p + "crossattention.output.dense") + h, p + "crossattention.output.LayerNorm", 1e-12)
        f = linear(torch.nn.functional.gelu(linear(h, p + "intermediate.dense")), p + "output.dense")
        h = norm(f + h, p + "output.LayerNorm", 1e-12)
    r = h[:, 0]                                                                   # [CLS]
    for index in (0, 2, 4, 6, 7):
        r = linear(r, f"mlp.layers.{index}")
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)  # ImageReward.__init__


def test_imagereward_is_its_mlp_on_blips_cls_feature_standardised(tiny_imagereward):
    import evaluate
    scorer = evaluate.ImageReward(tiny_imagereward / "ImageReward.pt",
                                  tiny_imagereward / "med_config.json",
                                  tiny_imagereward / "tokenizer", torch.device("cpu"))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    scores = scorer(images, prompts)
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images],
                              return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 16, 16)  # the image size read from the checkpoint
    text = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35,
                            return_tensors="pt")
    assert text.input_ids[0, :5].tolist() == [2, 5, *(scorer.tokenizer.convert_tokens_to_ids(
        ["red", "circle"])), 3]  # [CLS] a red circle [SEP]
    weights = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    expected = imagereward_by_hand(weights, pixels, text.input_ids, text.attention_mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores.std() > 0.01  # the prompts and images matter


HPS_WIDTH, HPS_HEADS = 32, 4


@pytest.fixture(scope="session")
def tiny_hps(tmp_path_factory, tiny_pickscore):
    """An HPS checkpoint ({"state_dict": open_clip's names}, random) and a CLIP config +
    processor folder of the same tiny shape with gelu, as open_clip's ViT-H-14 (--hps-clip)."""
    from transformers import CLIPConfig
    folder = tmp_path_factory.mktemp("hps")
    config = CLIPConfig.from_pretrained(tiny_pickscore / "model")
    config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"
    config.save_pretrained(folder / "clip")
    for file in (tiny_pickscore / "processor").iterdir():
        shutil.copy(file, folder / "clip")
    W, E, vocab = HPS_WIDTH, 16, config.text_config.vocab_size
    shapes = {"visual.conv1.weight": (W, 3, 8, 8), "visual.class_embedding": (W,),
              "visual.positional_embedding": (5, W), "visual.proj": (W, E),
              "token_embedding.weight": (vocab, W), "positional_embedding": (8, W),
              "text_projection": (W, E)}
    for name in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (W,)
    for tower in ("visual.transformer", "transformer"):
        for i in range(2):
            b = f"{tower}.resblocks.{i}."
            shapes.update({b + "attn.in_proj_weight": (3 * W, W), b + "attn.in_proj_bias": (3 * W,),
                           b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                           b + "mlp.c_fc.weight": (2 * W, W), b + "mlp.c_fc.bias": (2 * W,),
                           b + "mlp.c_proj.weight": (W, 2 * W), b + "mlp.c_proj.bias": (W,)})
            for name in ("ln_1", "ln_2"):
                shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (W,)
    state = random_weights(shapes, seed=3)
    state["logit_scale"] = torch.tensor(4.6)
    state["attn_mask"] = torch.full((8, 8), float("-inf")).triu(1)  # open_clip's buffer
    torch.save({"epoch": 1, "state_dict": state}, folder / "HPS_v2_compressed.pt")
    return folder


def hps_by_hand(weights, pixels, ids, eos):
    """hpsv2's score written out from open_clip's layout: 100 * cos(image, text) of a CLIP ViT
    (conv1, class token, ln_pre, pre-norm blocks, ln_post on the class token, @ proj) and its
    causal text transformer read at the end-of-text token."""
    linear, norm = layers(weights)

    def blocks(x, tower, keep=None):
        for i in range(2):
            b = f"{tower}.resblocks.{i}."
            q, k, v = (norm(x, b + "ln_1", 1e-5) @ weights[b + "attn.in_proj_weight"].T
                       + weights[b + "attn.in_proj_bias"]).chunk(3, -1)
            x = x + linear(attend(q, k, v, HPS_HEADS, keep), b + "attn.out_proj")
            x = x + linear(torch.nn.functional.gelu(linear(norm(x, b + "ln_2", 1e-5), b + "mlp.c_fc")),
                           b + "mlp.c_proj")
        return x

    x = torch.nn.functional.conv2d(pixels, weights["visual.conv1.weight"], stride=8)
    x = torch.cat([weights["visual.class_embedding"].expand(len(x), 1, -1),
                   x.flatten(2).transpose(1, 2)], 1) + weights["visual.positional_embedding"]
    x = blocks(norm(x, "visual.ln_pre", 1e-5), "visual.transformer")
    image = norm(x[:, 0], "visual.ln_post", 1e-5) @ weights["visual.proj"]
    L = ids.shape[1]
    t = weights["token_embedding.weight"][ids] + weights["positional_embedding"][:L]
    t = norm(blocks(t, "transformer", torch.ones(L, L, dtype=torch.bool).tril()), "ln_final", 1e-5)
    # open_clip reads the argmax token, its end-of-text (the largest id); here the first eos
    text = t[torch.arange(len(ids)), (ids == eos).int().argmax(-1)] @ weights["text_projection"]
    return 100 * torch.nn.functional.cosine_similarity(image, text)


def test_hps_is_100_cosine_of_the_hps_weights_in_clip(tiny_hps):
    import evaluate
    scorer = evaluate.HPS(tiny_hps / "HPS_v2_compressed.pt", tiny_hps / "clip", torch.device("cpu"))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = tiny_world.draw_images(prompts, torch.Generator().manual_seed(0))
    scores = scorer(images, prompts)
    pixels = scorer.processor(images=[plumbing.to_pil(i) for i in images],
                              return_tensors="pt")["pixel_values"]
    ids = scorer.processor(text=prompts, padding=True, return_tensors="pt").input_ids
    state = torch.load(tiny_hps / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    expected = hps_by_hand(state, pixels, ids, scorer.processor.tokenizer.eos_token_id)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-3)
    assert scores.std() > 0.1


def test_evaluate_scores_imagereward_and_hps_from_local_files(uninterrupted, tiny_imagereward,
                                                              tiny_hps, tmp_path):
    import evaluate
    out = tmp_path / "eval"
    assert evaluate.main([
        str(uninterrupted), "--seeds", "1", "--models", "base,iter_0", "--metrics", "imagereward,hps",
        "--imagereward-model", str(tiny_imagereward / "ImageReward.pt"),
        "--imagereward-config", str(tiny_imagereward / "med_config.json"),
        "--imagereward-tokenizer", str(tiny_imagereward / "tokenizer"),
        "--hps-checkpoint", str(tiny_hps / "HPS_v2_compressed.pt"), "--hps-clip", str(tiny_hps / "clip"),
        "--out", str(out)]) == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"imagereward", "imagereward win", "hps", "hps high"} <= set(rows[0])
    assert "annotator" not in rows[0] and rows[0]["imagereward"] != rows[1]["imagereward"]


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "imagereward", "--imagereward-model", "/no/such.pt"],
     "--imagereward-model /no/such.pt: no such file"),
    (["--metrics", "hps", "--hps-checkpoint", "/no/such.pt"], "--hps-checkpoint /no/such.pt: no such file"),
    (["--metrics", "hps"], "--hps-checkpoint not given and xswu/HPSv2/HPS_v2_compressed.pt cannot be "
                           "downloaded"),
    (["--pickapic", "/no/such.parquet"], "/no/such.parquet: cannot read as parquet"),
])
def test_evaluate_names_a_missing_scorer_file(uninterrupted, capsys, tmp_path, monkeypatch, argv, message):
    import evaluate
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here or in CI: the same either way
    code = evaluate.main([str(uninterrupted), *argv, "--out", str(tmp_path / "e")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
