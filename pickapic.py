"""Import Pick-a-Pic v2 preference pairs into sail.py's seed-pair format.

The paper's seed set is ~50K pairs, 6% of Pick-a-Pic v2's ~0.8M (after dropping ties). This
streams the data set's parquet shards one record batch at a time (0.8M pairs never sit in
memory), drops ties, keeps a fixed-seed random subset, and writes

    <out>/seed_pairs.json       [{"prompt", "chosen", "rejected"}, ...], paths relative to it
    <out>/images/<shard>-<row>-<0|1>.<ext>   the images, as stored in the data set

Run:
    python pickapic.py train-*.parquet --out data/pickapic --fraction 0.06 --seed 0
    python pickapic.py train-*.parquet --out data/pickapic --n-pairs 50000
    python pickapic.py --dataset yuvalkirstain/pickapic_v2 --split train --out data/pickapic ...
    python sail.py --model ... --seed-pairs data/pickapic/seed_pairs.json

The shards are the data set's own parquet files (columns caption, jpg_0, jpg_1, label_0,
label_1), as a `datasets` download or `huggingface-cli download` leaves them on disk; they need
pyarrow (in requirements.txt). --dataset reads a `datasets` dataset instead: a folder written by
save_to_disk, or a hub name (streamed); it needs datasets (pip install datasets). Both are
imported only here. Resumable: run the same command again and images already written are
skipped. Rows whose image bytes do not decode are skipped and counted. sail.py's default data for
a real model (default_subset) reads the hub's parquet shards with huggingface_hub and pyarrow.
"""

import argparse
import fnmatch
import io
import json
import random
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]


class InputError(Exception):
    """Bad input: printed on one line, exit code 2."""


# A source is (name, rows, count): rows(columns) iterates its rows as dicts of those columns;
# count is its number of rows (None when streamed). Parquet shards and datasets both become one.

def check_columns(where, names):
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InputError(f"{where}: missing Pick-a-Pic column(s) {', '.join(missing)} "
                         f"(expected {', '.join(COLUMNS)})")


def open_shards(paths):
    """A source per parquet shard, checked for the Pick-a-Pic columns up front."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading parquet needs pyarrow: pip install pyarrow")
    shards = []
    for path in paths:
        try:
            shard = pq.ParquetFile(path)
        except (OSError, ValueError) as error:  # missing file, not parquet
            raise InputError(f"{path}: cannot read as parquet: {error}")
        check_columns(path, shard.schema_arrow.names)
        shards.append((Path(path).stem, lambda columns, shard=shard: (
            record for batch in shard.iter_batches(batch_size=256, columns=columns)
            for record in batch.to_pylist()), shard.metadata.num_rows))
    return shards


def open_dataset(name, split):
    """A `datasets` dataset as one source: a save_to_disk folder, or a hub name (streamed)."""
    try:
        import datasets
    except ImportError:
        raise InputError("reading a datasets dataset needs datasets: pip install datasets")
    try:
        if Path(name).exists():
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:  # not a dataset folder, offline, unknown name
        raise InputError(f"--dataset {name}: cannot load: {str(error).strip().splitlines()[0]}")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(f"--dataset {name}: no split {split!r} (has {', '.join(data)})")
        data = data[split]
    if data.column_names is not None:  # a streamed dataset may not know its columns up front
        check_columns(name, data.column_names)
    count = len(data) if isinstance(data, datasets.Dataset) else None
    label = f"{Path(name).name}-{split}".replace("/", "_")
    return [(label, lambda columns: iter(data.select_columns(columns)), count)]


def keep_row(seed, source, row, fraction):
    """A fixed-seed coin per row, independent of batch sizes and of earlier (resumed) runs."""
    return random.Random(f"{seed}/{source}/{row}").random() < fraction


def image_extension(data):
    """The file extension of image bytes, or None when they do not decode as an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(image.format, "img")
    except (UnidentifiedImageError, OSError, SyntaxError, TypeError):
        return None


def write_image(data, path):
    """Write the bytes as they are (no re-encoding). An existing complete file is kept: that is
    what makes a re-run resume; a kill mid-write leaves only a .partial file behind."""
    if not path.exists() or path.stat().st_size != len(data):
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_bytes(data)
        partial.replace(path)


def import_pairs(sources, out, fraction, n_pairs, seed):
    """Stream every source, keep the subset, write images; returns (pairs, counts)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    counts_known = all(count is not None for _, _, count in sources)
    total = sum(count for _, _, count in sources) if counts_known else None
    if n_pairs is not None:  # a cheap first pass over the labels alone counts the non-tied rows
        non_tied = sum(record["label_0"] != record["label_1"]
                       for _, rows, _ in sources for record in rows(["label_0", "label_1"]))
        fraction = min(1.0, n_pairs / max(non_tied, 1))  # about n_pairs kept, never more
    pairs, counts = [], {"rows": 0, "ties": 0, "unsampled": 0, "corrupt": 0}
    bar = tqdm(total=total, desc="Pick-a-Pic rows", unit="row")
    for name, rows, _ in sources:
        for row, record in enumerate(rows(COLUMNS)):
            counts["rows"] += 1
            bar.update()
            if n_pairs is not None and len(pairs) >= n_pairs:
                continue
            if record["label_0"] == record["label_1"]:  # 0.5 / 0.5: a tie, no preference
                counts["ties"] += 1
                continue
            if not keep_row(seed, name, row, fraction):
                counts["unsampled"] += 1
                continue
            extensions = [image_extension(record[f"jpg_{i}"]) for i in (0, 1)]
            if None in extensions:
                counts["corrupt"] += 1
                continue
            names = [f"{name}-{row}-{i}.{extensions[i]}" for i in (0, 1)]
            for i in (0, 1):
                write_image(record[f"jpg_{i}"], images / names[i])
            winner = 0 if record["label_0"] > record["label_1"] else 1
            pairs.append({"prompt": record["caption"],
                          "chosen": f"images/{names[winner]}",
                          "rejected": f"images/{names[1 - winner]}"})
    bar.close()
    return pairs, counts


# sail.py's default data reads the data set's own parquet shards: listed and downloaded one at a
# time with huggingface_hub (diffusers depends on it), read with pyarrow; `datasets` is not needed.
# On the hub a split's shards are data/<split>-<i>-of-<n>-<hash>.parquet, e.g.
# data/train-00000-of-00645-b66ac786bf6fb553.parquet, data/test-00000-of-00014-387db523fa7e7121
# .parquet, data/validation_unique-00000-of-00001-33ead111845fc9c4.parquet (these names as cited in
# invoke-ai/invoke-training, src/invoke_training/_shared/data/datasets/build_dataset.py); each
# train shard holds some 1,500 rows (about 1M in 645 shards), hundreds of MB of images.

def shard_files(dataset, split):
    """The split's shards as (file name, fetch) sorted by name; fetch() gives a local path.
    `dataset` is a folder (shards in it or in its data/, as `huggingface-cli download` leaves
    them) or a hub name (fetch downloads the shard; huggingface_hub caches it)."""
    pattern = f"{split}-*.parquet"  # the hyphen: train-*, never train_unique-*
    if Path(dataset).is_dir():
        paths = [*Path(dataset).glob(pattern), *Path(dataset).glob(f"data/{pattern}")]
        shards = [(path.name, lambda path=path: path) for path in paths]
    else:
        import huggingface_hub  # imported here, as datasets and pyarrow are
        try:
            files = huggingface_hub.HfApi().list_repo_files(dataset, repo_type="dataset")
        except Exception as error:  # offline, no network, no such name: many exception types
            raise hub_error(dataset, error)
        shards = [(Path(file).name, lambda file=file: download(dataset, file))
                  for file in files if fnmatch.fnmatch(file, f"data/{pattern}")]
    if not shards:
        raise InputError(f"{dataset}: no {split} shards ({pattern}, in it or in its data/)")
    return sorted(shards, key=lambda shard: shard[0])


def download(dataset, file):
    import huggingface_hub
    try:
        return huggingface_hub.hf_hub_download(dataset, file, repo_type="dataset")
    except Exception as error:  # as in shard_files
        raise hub_error(dataset, error)


def hub_error(dataset, error):
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return InputError(f"cannot download {dataset} from the hub ({reason}): allow the download "
                      "once (the shards it needs are cached after)")


def shuffled_rows(path, seed):
    """(row, record) for every row of one shard, in a fixed shuffled order. The shard is read
    whole (a real one: hundreds of MB): a parquet file has no cheap access to one row."""
    [(name, _, _)] = open_shards([path])  # checks the columns, and that pyarrow is installed
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=COLUMNS)
    order = list(range(table.num_rows))
    random.Random(f"{seed}/{name}").shuffle(order)
    for row in order:
        yield row, table.slice(row, 1).to_pylist()[0]


def rows_in_order(shards, seed, hub):
    """(shard name, row, record) over shard_files' shards: the shards in a fixed shuffled order,
    the rows of each shuffled too. Lazy: a shard is fetched (downloaded) when its first row is
    asked for."""
    shards = list(shards)
    random.Random(f"{seed}/shards").shuffle(shards)
    for k, (file, fetch) in enumerate(shards):
        tqdm.write(f"Pick-a-Pic v2: shard {k + 1} of {len(shards)}, {file}" + (
            ": a download of hundreds of MB, once (huggingface_hub caches it)" if hub else ""))
        path = fetch()
        yield from ((Path(file).stem, row, record) for row, record in shuffled_rows(path, seed))


def default_subset(dataset, out, n_pairs, n_prompts, seed=0, split="train"):
    """sail.py's default data for a real model, written once to `out` and reused after.

    `dataset` is a hub name or a folder of its parquet shards. Its rows in a fixed shuffled order
    (rows_in_order): the first n_pairs non-tied pairs with decodable images are the seed pairs
    (seed_pairs.json, images/), and the captions of the rows after them, other than the seed
    pairs' captions, are the n_prompts prompts (prompts.txt, written last: its presence means the
    cache is complete). Only the shards needed are read. Resumable: images already written are
    kept, downloaded shards stay in huggingface_hub's cache.
    """
    out = Path(out)
    if (out / "prompts.txt").exists():
        return
    shards = shard_files(dataset, split)  # first: offline, its error is the only output
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs, prompts, captions = [], [], set()
    bar = tqdm(total=n_pairs + n_prompts, desc="Pick-a-Pic: seed pairs, then prompts", unit="row")
    for name, row, record in rows_in_order(shards, seed, hub=not Path(dataset).is_dir()):
        caption = " ".join(str(record["caption"]).split())  # one line each in prompts.txt
        if len(pairs) < n_pairs:
            extensions = [image_extension(record[f"jpg_{i}"]) for i in (0, 1)]
            if record["label_0"] == record["label_1"] or None in extensions:  # tie or corrupt
                continue
            names = [f"{name}-{row}-{i}.{extensions[i]}" for i in (0, 1)]
            for i in (0, 1):
                write_image(record[f"jpg_{i}"], images / names[i])
            winner = 0 if record["label_0"] > record["label_1"] else 1
            pairs.append({"prompt": record["caption"], "chosen": f"images/{names[winner]}",
                          "rejected": f"images/{names[1 - winner]}"})
            captions.add(caption)
        elif caption and not caption.startswith("#") and caption not in captions:
            prompts.append(caption)
            captions.add(caption)
        bar.update(len(pairs) + len(prompts) - bar.n)
        if len(prompts) == n_prompts:
            break
    bar.close()
    if len(prompts) < n_prompts:
        raise InputError(f"{dataset}: {len(pairs)} usable pairs and {len(prompts)} new captions "
                         f"in its {split} shards, but {n_pairs} and {n_prompts} are needed")
    for file, text in (("seed_pairs.json", json.dumps(pairs, indent=1)),
                       ("prompts.txt", "\n".join(prompts))):  # prompts.txt last: the cache is whole
        partial = out / f"{file}.partial"
        partial.write_text(text + "\n")
        partial.replace(out / file)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="*", help="Pick-a-Pic v2 parquet files")
    parser.add_argument("--dataset", help="instead of shards: a datasets folder (save_to_disk) "
                                          "or hub name, e.g. yuvalkirstain/pickapic_v2")
    parser.add_argument("--split", default="train", help="--dataset only: the split to read")
    parser.add_argument("--out", required=True, help="folder for seed_pairs.json and images/")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--fraction", type=float, default=1.0,
                        help="keep this fraction of the non-tied pairs (paper: 0.06)")
    subset.add_argument("--n-pairs", type=int,
                        help="keep about this many pairs, never more (a first pass counts ties)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not 0 < args.fraction <= 1:
            raise InputError("--fraction must be in (0, 1]")
        if args.n_pairs is not None and args.n_pairs < 1:
            raise InputError("--n-pairs must be >= 1")
        if bool(args.shards) == bool(args.dataset):
            raise InputError("give parquet shards or --dataset, not both and not neither")
        sources = open_dataset(args.dataset, args.split) if args.dataset else open_shards(args.shards)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    pairs, counts = import_pairs(sources, out, args.fraction, args.n_pairs, args.seed)
    summary = (f"rows {counts['rows']}, ties dropped {counts['ties']}, not sampled "
               f"{counts['unsampled']}, corrupt images skipped {counts['corrupt']}")
    if not pairs:
        print(f"error: no pairs kept ({summary})", file=sys.stderr)
        return 2
    partial = out / "seed_pairs.json.partial"
    partial.write_text(json.dumps(pairs, indent=1) + "\n")
    partial.replace(out / "seed_pairs.json")
    print(f"{len(pairs)} pairs -> {out / 'seed_pairs.json'} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
