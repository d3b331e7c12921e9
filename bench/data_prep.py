"""Data preparation throughput and memory: ours versus TRL's own SFTTrainer preprocessing, and the cache.

Writes N synthetic records (`--format chat`: conversations with a system prompt sometimes and 1-3
exchanges; `--format alpaca`: instruction, sometimes an input, output) to a JSONL file and
prepares them for training with the real Mistral v3 tokenizer, three ways:

- TRL: `datasets.load_dataset("json")` (alpaca records mapped to user/assistant messages, timed)
  then `SFTTrainer` preparation with `assistant_only_loss=True` (and `packing` unless
  `--no-packing`), given the shipped Mistral v3 template with `{% generation %}` markers around
  each assistant turn so it builds the assistant masks itself;
- ours, cold: `job.data.prepare.prepare` from an empty scratch: hash, read and validate every record,
  tokenize with template-agnostic masks, pack if asked, save the Arrow cache;
- ours, cache hit: the same call again (a restart).

Each runs in its own process; the parent samples the resident memory of that process and its
workers (the whole tree) and reports the peak. Both use the same number of processes
(`--num-proc`). Before timing, the masks of the first examples are compared: TRL's and ours must
be identical token for token. `--examples` takes several sizes to show memory against size.

    python bench/data_prep.py [--examples 50000 --num-proc 2 --max-length 2048]
    python bench/data_prep.py --format alpaca --no-packing --examples 100000,1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
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


PIPELINES = (("TRL SFTTrainer preparation", "trl"), ("ours, cold", "ours"), ("ours, cache hit", "hit"))


def write_alpaca(path: Path, count: int, seed: int) -> None:
    """Alpaca records: instruction, an input in about 40% of them, output (written in 64k-record batches)."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(low, high))).capitalize() + "."

    with path.open("w") as handle:
        for start in range(0, count, 1 << 16):
            lines = []
            for _ in range(min(1 << 16, count - start)):
                record = {"instruction": sentence(4, 25), "input": sentence(5, 40) if rng.random() < 0.4 else ""}
                record["output"] = " ".join(sentence(5, 20) for _ in range(rng.randint(1, 6)))
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            handle.write("".join(lines))


def alpaca_to_messages(batch: dict[str, list]) -> dict[str, list]:
    """The user/assistant turns the job makes of an alpaca record (`job.data.formats`), for TRL."""
    out = []
    for instruction, extra, output in zip(batch["instruction"], batch["input"], batch["output"], strict=True):
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    return {"messages": out}


MARKED_TEMPLATE = """\
{%- if messages[0]["role"] == "system" %}{% set system_message = messages[0]["content"] %}\
{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}\
{%- set ns = namespace(last_user=-1) %}\
{%- for message in loop_messages %}{% if message["role"] == "user" %}{% set ns.last_user = loop.index0 %}{% endif %}\
{% endfor %}{{- bos_token }}\
{%- for message in loop_messages %}\
{%- if message["role"] == "user" %}\
{%- if loop.index0 == ns.last_user and system_message is defined %}\
{{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\
{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{% endif %}\
{%- else %}{%- generation %}{{- " " + message["content"] + eos_token }}{%- endgeneration %}{% endif %}\
{%- endfor %}"""
"""The shipped Mistral v3 template for plain chats (system, user, assistant) with each assistant turn's
text and its EOS in a generation block, so TRL builds the assistant masks itself. The mask check
below compares it with the job's own rendering of the shipped template."""


def generation_marked_template() -> str:
    return MARKED_TEMPLATE


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
    if "instruction" in raw.column_names:
        raw = raw.map(alpaca_to_messages, batched=True, remove_columns=raw.column_names, num_proc=args.dataset_num_proc)
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
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.jsonl"
    with path.open() as source:
        sample.write_text("".join(next(source) for _ in range(count)))
    theirs, _ = trl_prepare(sample, model_dir, work / "sample-trl", max_length=1 << 20, num_proc=1, packing=False)
    ours, _ = our_prepare(sample, model_dir, work / "sample-ours", max_length=1 << 20, num_proc=1, packing=False)
    theirs_rows = [(r["input_ids"], r["labels"]) for r in theirs]
    ours_rows = list(zip(ours.train.input_ids, ours.train.labels, strict=True))
    differing = sum(a != b for a, b in zip(theirs_rows, ours_rows, strict=True))
    return differing


def tree_memory(process) -> tuple[int, int]:
    """(PSS, anonymous PSS) of `process` and all its descendants (worker processes included). Proportional set
    size counts pages that forked workers share with their parent once, not once per process. The anonymous
    part is the heap: what the pipeline holds. The rest is file pages, the memory-mapped Arrow files read
    through the page cache, which the kernel drops under pressure."""
    import psutil

    total = anonymous = 0
    for member in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.Error, OSError):  # a worker that just ended
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{member.pid}/smaps_rollup").read_text().splitlines()[1:]
            )
            total += int(fields["Pss"].split()[0]) * 1024
            anonymous += int(fields["Pss_Anon"].split()[0]) * 1024
    return total, anonymous


def measured(argv: list[str]) -> tuple[dict, tuple[int, int]]:
    """Run this script as a child with `argv`; its JSON result and the peak (PSS, anonymous PSS) of its tree."""
    import psutil

    child = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True)
    process, peak, done = psutil.Process(child.pid), (0, 0), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            now = tree_memory(process)
            peak = (max(peak[0], now[0]), max(peak[1], now[1]))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{argv[:2]} failed with exit code {child.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak


def child(options: argparse.Namespace) -> None:
    """One pipeline, in this process: prints {"rows", "tokens", "seconds"} as its last line."""
    from job.logs import setup_logging

    setup_logging(json_mode=False, level="WARNING")
    data, model_dir, work = Path(options.data), Path(options.model), Path(options.work)
    packing = not options.no_packing
    common = {"max_length": options.max_length, "num_proc": options.num_proc, "packing": packing}
    if options.child == "trl":
        theirs, seconds = trl_prepare(data, model_dir, work, **common)
        tokens = sum(len(ids) for ids in theirs.with_format("arrow")[:]["input_ids"].to_pylist())
        result = {"rows": len(theirs), "tokens": tokens, "seconds": seconds}
    else:
        ours, seconds = our_prepare(data, model_dir, work / "scratch", **common)
        assert ours.cache_hit == (options.child == "hit")
        result = {"rows": ours.train.stats["sequences"], "tokens": ours.train.stats["tokens"], "seconds": seconds}
    print(json.dumps(result))


PIPELINES = (("TRL SFTTrainer preparation", "trl"), ("ours, cold", "ours"), ("ours, cache hit", "hit"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", default="50000", help="one size or several, comma-separated")
    parser.add_argument("--format", choices=("chat", "alpaca"), default="chat")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", default="trl,ours,hit", help="which to run, comma-separated (default: all)")
    parser.add_argument("--child", choices=("trl", "ours", "hit"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    options = parser.parse_args()
    os.environ.setdefault("SFT_LOG_LEVEL", "WARNING")
    if options.child:
        child(options)
        return
    packing = not options.no_packing

    from job.logs import setup_logging
    from job.model.tiny import ensure_tiny_model

    setup_logging(json_mode=False, level="WARNING")
    results = []
    with tempfile.TemporaryDirectory(prefix="data-prep-bench-") as temporary:
        work = Path(temporary)
        model_dir = ensure_tiny_model(work / "tiny-mistral")
        for size in (int(n) for n in options.examples.split(",")):
            data = work / f"train-{size}.jsonl"
            (write_alpaca if options.format == "alpaca" else write_conversations)(data, size, options.seed)
            differing = check_same_masks(data, model_dir, work / f"check-{size}", 200)
            print(f"masks: TRL (generation markers) vs ours (rendered prefixes) on 200 records: {differing} differ")
            shared = ["--data", str(data), "--model", str(model_dir), "--num-proc", str(options.num_proc),
                      "--max-length", str(options.max_length), *(["--no-packing"] if not packing else [])]  # fmt: skip
            for name, kind in PIPELINES:
                if kind not in options.pipelines.split(","):
                    continue
                folder = work / f"{kind if kind != 'hit' else 'ours'}-{size}"
                result, (peak, anonymous) = measured(["--child", kind, "--work", str(folder), *shared])
                results.append({"pipeline": name, "records": size, "mib": round(data.stat().st_size / 2**20, 1),
                                **result, "peak_pss_mib": round(peak / 2**20),
                                "peak_anon_pss_mib": round(anonymous / 2**20)})  # fmt: skip
                print(f"  {name} at {size:,}: {result['seconds']:.1f} s, peak {peak / 2**20:,.0f} MiB "
                      f"({anonymous / 2**20:,.0f} MiB anonymous)", flush=True)  # fmt: skip
            data.unlink()

    print(
        f"\n{options.format} records, max_length {options.max_length}, packing {packing}, {options.num_proc} "
        "process(es), tokenizer: Mistral v3 (32768); peak PSS: the pipeline's process and its workers\n"
    )
    print("| pipeline | records | JSONL MiB | rows | tokens | seconds | tokens/s | vs TRL | peak PSS MiB | anon MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        trl = next((r for r in results if r["records"] == row["records"] and r["pipeline"].startswith("TRL")), None)
        rate = row["tokens"] / row["seconds"]
        row["tokens_per_second"] = round(rate)
        versus = f"{rate / (trl['tokens'] / trl['seconds']):.2f}x" if trl else "-"
        print(
            f"| {row['pipeline']} | {row['records']:,} | {row['mib']} | {row['rows']:,} | {row['tokens']:,} | "
            f"{row['seconds']:.1f} | {rate:,.0f} | {versus} | {row['peak_pss_mib']:,} | {row['peak_anon_pss_mib']:,} |"
        )
    print(json.dumps({"bench": "data_prep", "format": options.format, "packing": packing, "results": results}))


if __name__ == "__main__":
    main()
