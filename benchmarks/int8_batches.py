"""int8 answers that do not depend on the batch: one activation scale per row against ONNX Runtime's per batch.

    python benchmarks/int8_batches.py --model outputs/demo/model --data $HF_REAUGKD_CACHE/data/critic_snippets

The student (with its knowledge base) is exported three ways: fp32, int8 as `hf-reaugkd export --quantize int8` does
it (`onnx_quantization.quantize_per_row`: one scale per weight column and per activation row), and int8 as it did
before (ONNX Runtime's `quantize_dynamic`, per-channel weights, one activation scale per tensor, i.e. per batch); both
int8 graphs re-score the scan's candidates from the fp32 keys. On every test row, served through
`ONNXTextClassificationPipeline.run` at batch 1, 8 and 32 (padded to the batch's longest text, as served): how many
labels and neighbour lists (the config's k) are those of batch 1, the largest |Δp|, accuracy, and agreement with
fp32. Speed: the same pre-tokenized batches (batch 32 and 1, padded to 64 and 128 tokens), `--threads` threads, the
runtimes in turn in each of `--rounds` rounds; ratios paired per round (median, range). Output:
`results/int8_batches.json`.
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, environment, read_csv, write_json
from tqdm.auto import tqdm

from hf_reaugkd import editing, onnx_export
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline

BATCH_SIZES = (1, 8, 32)
VARIANTS = ("fp32", "int8 per row", "int8 per batch")


def per_batch_quantization(model, onnx) -> None:
    """ONNX Runtime's dynamic quantization (per-channel weights, one scale per activation tensor), in place."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as scratch:
        source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save(model, source)
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
        model.CopyFrom(onnx.load(target))


def export_variants(model_dir: Path, work_dir: Path) -> dict[str, Path]:
    folders = {"per row": work_dir / "per_row", "per batch": work_dir / "per_batch"}
    for name, folder in folders.items():
        if (folder / "onnx" / "model_quantized.onnx").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
        quantize = onnx_export.quantize_per_row
        if name == "per batch":
            onnx_export.quantize_per_row = per_batch_quantization
        try:
            editing.export(folder, "int8")
        finally:
            onnx_export.quantize_per_row = quantize
    return folders


def runtimes(folders: dict[str, Path], threads: int) -> dict[str, ONNXTextClassificationPipeline]:
    return {
        "fp32": ONNXTextClassificationPipeline(folders["per row"], num_threads=threads),
        "int8 per row": ONNXTextClassificationPipeline(folders["per row"], quantized=True, num_threads=threads),
        "int8 per batch": ONNXTextClassificationPipeline(folders["per batch"], quantized=True, num_threads=threads),
    }


def batch_invariance(served: dict, texts: list[str], labels: list[str], knn_k: int) -> dict:
    outputs = {}
    for name, runtime in served.items():
        for batch in BATCH_SIZES:
            runs = [runtime.run(texts[i : i + batch], knn_k=knn_k) for i in range(0, len(texts), batch)]
            outputs[name, batch] = {
                key: np.concatenate([run[key] for run in runs]) for key in ("probabilities", "neighbor_ids")
            }
    id2label = served["fp32"].id2label
    fp32_labels = outputs["fp32", 1]["probabilities"].argmax(axis=1)
    report = {}
    for name in served:
        alone = outputs[name, 1]
        entry = {"rows": len(texts)}
        for batch in BATCH_SIZES:
            found = outputs[name, batch]
            predicted = found["probabilities"].argmax(axis=1)
            entry[f"batch {batch}"] = {
                "accuracy": float(np.mean([id2label[int(p)] == y for p, y in zip(predicted, labels, strict=True)])),
                "same_label_as_batch_1": int((predicted == alone["probabilities"].argmax(axis=1)).sum()),
                "same_neighbours_as_batch_1": int((found["neighbor_ids"] == alone["neighbor_ids"]).all(axis=1).sum()),
                "max_abs_probability_difference": float(np.abs(found["probabilities"] - alone["probabilities"]).max()),
                "agreement_with_fp32_batch_1": float((predicted == fp32_labels).mean()),
            }
        report[name] = entry
    return report


def speed(served: dict, texts: list[str], rounds: int, batches: int, singles: int) -> list[dict]:
    rows = []
    for batch_size, length in [(32, 64), (32, 128), (1, 64), (1, 128)]:
        count = batches if batch_size > 1 else singles
        feeds = {}
        for name, runtime in served.items():
            tokenizer = runtime.tokenizer
            tokenizer.enable_padding(
                length=length, pad_id=tokenizer.padding["pad_id"], pad_token=tokenizer.padding["pad_token"]
            )
            tokenizer.enable_truncation(length)
            feeds[name] = [runtime._encode(texts[i * batch_size : (i + 1) * batch_size]) for i in range(count)]
            tokenizer.enable_padding(pad_id=tokenizer.padding["pad_id"], pad_token=tokenizer.padding["pad_token"])
        seconds = {name: [] for name in served}
        for name, runtime in served.items():  # warm-up
            runtime.session.run(["probabilities"], feeds[name][0])
        for _ in tqdm(range(rounds), desc=f"batch {batch_size}, length {length}", leave=False):
            for name, runtime in served.items():
                runtime.session.run(["probabilities"], feeds[name][0])  # untimed: the previous runtime's threads
                start = time.perf_counter()
                for feed in feeds[name]:
                    runtime.session.run(["probabilities"], feed)
                seconds[name].append(time.perf_counter() - start)
        for name in served:
            ratios = [b / a for a, b in zip(seconds[name], seconds["int8 per batch"], strict=True)]
            rows.append({
                "runtime": name, "batch_size": batch_size, "max_length": length,
                "examples_per_second": statistics.median(count * batch_size / s for s in seconds[name]),
                "speed_vs_int8_per_batch": statistics.median(ratios), "range": [min(ratios), max(ratios)],
            })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved student (e.g. outputs/demo/model)")
    parser.add_argument("--data", type=Path, required=True, help="its task: a folder with test.csv")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 per round and setting")
    parser.add_argument("--singles", type=int, default=32, help="texts timed one at a time per round and setting")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "int8_batches")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "int8_batches.json")
    args = parser.parse_args()
    folders = export_variants(args.model, args.work_dir / args.data.name)
    texts, labels = read_csv(args.data / "test.csv")
    served = runtimes(folders, args.threads)
    knn_k = served["fp32"].config["knn_k"]
    report = {"environment": environment(), "task": args.data.name, "knn_k": knn_k}
    report["batch_invariance"] = batch_invariance(served, texts, labels, knn_k)
    write_json(args.output, report)
    report["speed"] = speed(served, texts, args.rounds, args.batches, args.singles)
    write_json(args.output, report)
    for name, entry in report["batch_invariance"].items():
        for batch in BATCH_SIZES[1:]:
            found = entry[f"batch {batch}"]
            print(f"{name}, batch {batch}: labels {found['same_label_as_batch_1']}/{entry['rows']}, neighbours "
                  f"{found['same_neighbours_as_batch_1']}/{entry['rows']}, accuracy {100 * found['accuracy']:.2f}")  # fmt: skip
    for row in report["speed"]:
        print(f"{row['runtime']}, batch {row['batch_size']}, length {row['max_length']}: "
              f"{row['examples_per_second']:.0f}/s, ×{row['speed_vs_int8_per_batch']:.2f} the per-batch int8")  # fmt: skip


if __name__ == "__main__":
    main()
