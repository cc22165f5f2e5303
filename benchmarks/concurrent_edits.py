"""Concurrent edits of one model folder: nothing lost, and a reader that reloads beside the edits sees no error.

    python benchmarks/concurrent_edits.py [--trials 10] [--writers 2 4 8] [--calls 2000] [--edits 20] [--parts ...]

On a tiny random student (the tests' kind: a 2-layer BERT of width 32 and a 60-row knowledge base with texts):

1. **Writers**: N `hf-reaugkd kb add` processes started at once on one folder, each adding 2 rows of its own. Every
   row a writer reported (exit 0, "added 2 rows (ids a–b)") must be in the folder afterwards, by text, or the writer
   must have failed with a message and written nothing. `--trials` trials per N.
2. **Reader**: a process that loads the ONNX runtime anew for every call (`--calls`), while this one makes `--edits`
   edits of the exported folder (a `kb add` of one row, then its `kb remove`, in turn: the folder has two versions,
   each exported again by the edit). Every answer must be one of the two versions' answers, exactly; every load and
   call must succeed.
3. **Refusal memory**: peak RSS of a fresh process that loads the valid model, against one that is refused a config
   declaring `"num_labels": 30000000` (without `id2label`), which built a 30M-entry label map before.

Output: `results/concurrent_edits.json`.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, write_json
from transformers import BertConfig, BertModel, BertTokenizerFast

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification, editing

WORDS = [
    "the",
    "movie",
    "was",
    "good",
    "a",
    "boring",
    "long",
    "plot",
    "great",
    "actor",
    "and",
    "music",
    "awful",
    "film",
    "fun",
    "hello",
    "world",
    "row",
    "added",
]
QUERY = "the movie was good fun"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
PARTS = ["writers", "reader", "memory"]


def tiny_folder(directory: Path) -> Path:
    """A random 2-layer student with a 60-row knowledge base storing the texts "row i", saved with a tokenizer."""
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=64))  # fmt: skip
    keys, values = torch.randn(60, 16), torch.softmax(3 * torch.randn(60, 3), dim=-1)
    knowledge_base = KnowledgeBase.build(keys, values, "torch")
    knowledge_base.set_texts([f"row {i}" for i in range(60)])
    model = ReAugKDForSequenceClassification.from_encoder(encoder, LABELS, knowledge_base=knowledge_base, kb_dim=16)
    model.config.query_mean = [0.0] * 16
    model.save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab, model_max_length=32).save_pretrained(directory)
    return directory


def writers_trial(folder: Path, writers: int, trial: int) -> dict:
    """`writers` kb add processes at once; which reported rows are missing afterwards."""
    rows, processes = {}, []
    for writer in range(writers):
        texts = [f"writer {trial} {writer} one", f"writer {trial} {writer} two"]
        path = folder.parent / f"rows-{writer}.csv"
        path.write_text("text,label\n" + "".join(f"{text},positive\n" for text in texts))
        rows[writer] = texts
        command = [sys.executable, "-m", "hf_reaugkd", "kb", "add", str(folder), "--file", str(path)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    stored = None
    reported, failed, messages = [], [], []
    for writer, process in enumerate(processes):
        out, err = process.communicate(timeout=600)
        if process.returncode == 0 and re.search(r"added 2 rows \(ids \d+–\d+\)", out):
            reported.append(writer)
        else:
            failed.append(writer)
            messages.append(err.strip().splitlines()[-1] if err.strip() else out)
    stored = set(editing.load_student(folder)[0].knowledge_base.texts)
    lost = [text for writer in reported for text in rows[writer] if text not in stored]
    half_written = [text for writer in failed for text in rows[writer] if text in stored]
    return {"reported": len(reported), "failed": len(failed), "lost_rows": lost, "failed_but_written": half_written,
            "messages": messages}  # fmt: skip


READER = """
import json, sys, time
from pathlib import Path
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
folder, calls, done = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
answers, errors = [], []
while len(answers) + len(errors) < calls or not done.exists():
    try:
        answers.append(ONNXTextClassificationPipeline(folder)({query!r}, top_k=None, neighbors=3))
    except Exception as err:
        errors.append(f"{{type(err).__name__}}: {{err}}")
print(json.dumps({{"answers": answers, "errors": errors}}))
"""


def reader_beside_edits(folder: Path, calls: int, edits: int) -> dict:
    from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline

    editing.export(folder)
    versions = [ONNXTextClassificationPipeline(folder)(QUERY, top_k=None, neighbors=3)]
    editing.add_texts(folder, ["added fun"], ["positive"])
    versions.append(ONNXTextClassificationPipeline(folder)(QUERY, top_k=None, neighbors=3))
    editing.remove_rows(folder, ids=[60])
    assert versions[1] != versions[0], "the added row should change the answer"
    done = folder.parent / "edits-done"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER.format(query=QUERY), str(folder), str(calls), str(done)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    start = time.perf_counter()
    for edit in range(edits):
        if edit % 2 == 0:
            editing.add_texts(folder, ["added fun"], ["positive"])
        else:
            editing.remove_rows(folder, ids=[60])
    edit_seconds = time.perf_counter() - start
    done.touch()
    out, err = reader.communicate(timeout=3600)
    if reader.returncode != 0:
        raise RuntimeError(err[-3000:])
    found = json.loads(out.strip().splitlines()[-1])
    answers = found["answers"]
    return {
        "calls": len(answers) + len(found["errors"]),
        "errors": len(found["errors"]),
        "first_errors": found["errors"][:3],
        "wrong_answers": sum(answer not in versions for answer in answers),
        "answers_per_version": [sum(answer == version for answer in answers) for version in versions],
        "edits": edits,
        "edit_seconds": round(edit_seconds, 1),
    }


PEAK_RSS = """
import json, sys
from hf_reaugkd import ReAugKDForSequenceClassification
try:
    ReAugKDForSequenceClassification.from_pretrained(sys.argv[1])
    outcome = "loaded"
except ValueError as err:
    outcome = str(err)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # ru_maxrss survives exec
print(json.dumps({"peak_rss_mib": int(hwm.split()[1]) / 1024, "outcome": outcome}))
"""


def refusal_memory(folder: Path) -> dict:
    crafted = folder.parent / "crafted"
    subprocess.run(["cp", "-r", str(folder), str(crafted)], check=True)
    config = json.loads((crafted / "config.json").read_text())
    for name in ("id2label", "label2id"):
        config.pop(name, None)
    config["num_labels"] = 30_000_000
    (crafted / "config.json").write_text(json.dumps(config))
    result = {}
    for name, path in (("valid model", folder), ("num_labels 30M", crafted)):
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True)
        result[name] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="the others keep their record")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "concurrent_edits.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report["environment"] = environment()
    with tempfile.TemporaryDirectory() as scratch:
        if "writers" in args.parts:
            report["writers"] = {}
        for writers in args.writers if "writers" in args.parts else ():
            trials = []
            for trial in range(args.trials):
                folder = tiny_folder(Path(scratch) / f"writers-{writers}-{trial}" / "model")
                trials.append(writers_trial(folder, writers, trial))
                print(f"{writers} writers, trial {trial}: {trials[-1]}", flush=True)
            report["writers"][writers] = {
                "trials": args.trials,
                "rows_lost": sum(len(t["lost_rows"]) for t in trials),
                "writers_failed": sum(t["failed"] for t in trials),
                "failed_but_written": sum(len(t["failed_but_written"]) for t in trials),
                "details": trials,
            }
            write_json(args.output, report)
        if "reader" in args.parts:
            folder = tiny_folder(Path(scratch) / "reader" / "model")
            report["reader"] = reader_beside_edits(folder, args.calls, args.edits)
            print("reader:", report["reader"], flush=True)
        if "memory" in args.parts:
            report["refusal_memory"] = refusal_memory(tiny_folder(Path(scratch) / "memory" / "model"))
            print("refusal memory:", report["refusal_memory"], flush=True)
    write_json(args.output, report)


if __name__ == "__main__":
    main()
