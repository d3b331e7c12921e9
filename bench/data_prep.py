"""Data preparation throughput: ours versus TRL's own SFTTrainer preprocessing, and the cache.

Writes N synthetic chat conversations (system prompt sometimes, 1-3 user/assistant exchanges) to a
JSONL file and prepares them for training with the real Mistral v3 tokenizer, three ways:

- TRL: `datasets.load_dataset("json")` then `SFTTrainer` preparation with `assistant_only_loss=True`
  and `packing=True` (best-fit decreasing), given the shipped Mistral v3 template with
  `{% generation %}` markers around each assistant turn so it builds the assistant masks itself;
- ours, cold: `job.data.prepare.prepare` from an empty scratch: hash, read and validate every record,
  tokenize with template-agnostic masks, pack (best-fit decreasing), save the Arrow cache;
- ours, cache hit: the same call again (a restart).

Both use the same number of processes (`--num-proc`). Before timing, the masks of the first
examples are compared: TRL's and ours must be identical token for token.

    python bench/data_prep.py [--examples 50000 --num-proc 2 --max-length 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCABULARY = (
    "the model answers questions about data pipelines storage checkpoints and training runs with care while "
    "a user asks for help on tokenizers masks packing throughput memory gradients optimizers and schedules "
    "sometimes in detail sometimes briefly 42 1.5e-5 GPU CPU S3 JSON Arrow Parquet é ü 日本 🐸"
)
WORDS = VOCABULARY.split()


def write_conversations(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."

    with path.open("w") as handle:
        for _ in range(count):
            turns = [{"role": "system", "content": sentence(5, 15)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                turns.append({"role": "user", "content": sentence(5, 40)})
                turns.append({"role": "assistant", "content": sentence(10, 80)})
            handle.write(json.dumps({"messages": turns}) + "\n")


def generation_marked_template() -> str:
    """The shipped Mistral v3 template with each assistant turn's text (and its EOS) in a generation block."""
    from job.data.masking import default_chat_template

    plain = default_chat_template()
    turn = '{{- " " + message["content"] + eos_token }}'
    marked = plain.replace(turn, "{%- generation %}" + turn + "{%- endgeneration %}")
    assert marked != plain, "the template changed: mark its assistant turn by hand"
    return marked


def trl_prepare(path: Path, model_dir: Path, work: Path, *, max_length: int, num_proc: int, packing: bool):
    """TRL's own preparation (tokenize, assistant masks, labels, pack), timed from the JSONL file."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = generation_marked_template()
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(work / "trl"), assistant_only_loss=True, packing=packing, max_length=max_length,
        dataset_num_proc=num_proc if num_proc > 1 else None, use_cpu=True, bf16=False, report_to="none",
    )  # fmt: skip
    started = time.perf_counter()
    raw = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(work / "hf-cache"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer)
    return trainer.train_dataset, time.perf_counter() - started


def our_prepare(path: Path, model_dir: Path, scratch: Path, *, max_length: int, num_proc: int, packing: bool):
    from job.config.load import load_config
    from job.data.prepare import prepare

    config = load_config(
        None,
        [f"data.train={path}", f"run.scratch={scratch}", f"model.source={model_dir}", f"data.max_length={max_length}",
         f"data.num_proc={num_proc}", f"data.packing={str(packing).lower()}"],
        environ={},
    )  # fmt: skip
    started = time.perf_counter()
    prepared = prepare(config)
    return prepared, time.perf_counter() - started


def check_same_masks(path: Path, model_dir: Path, work: Path, count: int) -> int:
    """Prepare the first `count` conversations unpacked both ways; the (input_ids, labels) must match."""
    sample = work / "sample.jsonl"
    with path.open() as source:
        sample.write_text("".join(next(source) for _ in range(count)))
    theirs, _ = trl_prepare(sample, model_dir, work / "sample-trl", max_length=1 << 20, num_proc=1, packing=False)
    ours, _ = our_prepare(sample, model_dir, work / "sample-ours", max_length=1 << 20, num_proc=1, packing=False)
    theirs_rows = [(r["input_ids"], r["labels"]) for r in theirs]
    ours_rows = list(zip(ours.train.input_ids, ours.train.labels, strict=True))
    differing = sum(a != b for a, b in zip(theirs_rows, ours_rows, strict=True))
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    os.environ.setdefault("SFT_LOG_LEVEL", "WARNING")
    packing = not options.no_packing

    from job.logs import setup_logging
    from job.model.tiny import ensure_tiny_model

    setup_logging(json_mode=False, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="data-prep-bench-") as temporary:
        work = Path(temporary)
        model_dir = ensure_tiny_model(work / "tiny-mistral")
        data = work / "train.jsonl"
        write_conversations(data, options.examples, options.seed)
        size_mb = data.stat().st_size / 2**20
        differing = check_same_masks(data, model_dir, work, 200)
        print(f"masks: TRL (generation markers) vs ours (rendered prefixes) on 200 examples: {differing} differ")

        theirs, trl_seconds = trl_prepare(
            data, model_dir, work, max_length=options.max_length, num_proc=options.num_proc, packing=packing
        )
        trl_tokens = sum(len(ids) for ids in theirs.with_format("arrow")[:]["input_ids"].to_pylist())
        ours, cold_seconds = our_prepare(
            data, model_dir, work / "scratch", max_length=options.max_length, num_proc=options.num_proc, packing=packing
        )
        again, hit_seconds = our_prepare(
            data, model_dir, work / "scratch", max_length=options.max_length, num_proc=options.num_proc, packing=packing
        )
        assert again.cache_hit and not ours.cache_hit
        our_tokens = ours.train.stats["tokens"]

    rows = [
        ("TRL SFTTrainer preparation", len(theirs), trl_tokens, trl_seconds),
        ("ours, cold (validate+tokenize+mask+pack+cache)", ours.train.stats["sequences"], our_tokens, cold_seconds),
        ("ours, cache hit (restart)", again.train.stats["sequences"], again.train.stats["tokens"], hit_seconds),
    ]
    print(
        f"\n{options.examples} conversations ({size_mb:.1f} MiB JSONL), max_length {options.max_length}, "
        f"packing {packing}, {options.num_proc} process(es), tokenizer: Mistral v3 (32768)\n"
    )
    print("| pipeline | rows | tokens | seconds | tokens/s | vs TRL |")
    print("|---|---:|---:|---:|---:|---:|")
    trl_rate = trl_tokens / trl_seconds
    for name, count, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"| {name} | {count:,} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {rate / trl_rate:.2f}x |")
    print(f"\ncache hit: {cold_seconds / hit_seconds:.1f}x faster than cold")


if __name__ == "__main__":
    main()
