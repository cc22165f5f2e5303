"""Deployment benchmark: the student with its knowledge base in ONNX Runtime against PyTorch and the teachers.

    hf-reaugkd distill                                   # the demo's student: outputs/demo/model
    python benchmarks/deploy.py --model outputs/demo/model --teacher outputs/demo/stages/teacher-* \
        --data $HF_REAUGKD_CACHE/data/critic_snippets \
        --parity bbc_news=RUN/bbc/model:$HF_REAUGKD_CACHE/data/bbc_news

One run, side by side, `--threads` (2) threads for PyTorch and ONNX Runtime alike, `--rounds` (15) rounds; in each
round every runtime runs the same pre-tokenized batches (padded to the max length: 64 and 128; batch 32 and batch 1),
one runtime after the other, each after an untimed run of its own (so another runtime's still-spinning threads do
not slow its first batch); ratios are per round, median and range over rounds. Tokenization is left out of every timing.
Runtimes: the task's fine-tuned teacher (`--teacher`) as a user ships it without distilling, in ONNX fp32 and int8
(`quantize_dynamic`, per-channel weights: optimum's recipe), against which every speed is stated first; the MiniLM-L6
and mpnet-base teachers in PyTorch (a classification head on the pretrained encoder: timing needs no fine-tuning); the student alone (β = 0) and with its knowledge base in PyTorch; the same in ONNX Runtime fp32
and int8 (`hf-reaugkd export --quantize int8`). "Student alone" in ONNX is the same graph over a one-entry knowledge
base, so `knowledge base share` (paired, per round: 1 − t(one entry) / t(knowledge base)) is what the scan, the vote
and the mixing cost end to end. It moves by several points between rounds, so the share is also read where it runs:
ONNX Runtime's profiler, the kernel time of every node from the knowledge-base scan on (scan, top-k, re-scoring,
vote, mixing), as a share of the graph's kernel time (`profiled_retrieval_share`). The same share is measured over 1M keys (the model's keys repeated with noise),
with the int8 graph's recall@16 of the exact neighbours.

Accuracy on the test split beside each runtime, % of the teacher's, and each student runtime's fidelity to the
teacher (top-1 agreement and mean KL(teacher ‖ student), Stanton et al., NeurIPS 2021); per `--parity` task (the timed model's task first):
fp32 ONNX against the PyTorch pipeline on every row (same label, max |Δp|, same neighbour ids), int8 against fp32
(accuracy, neighbour overlap). Peak RSS: each runtime loaded and run alone in a fresh process.
Output: `results/deploy.json` (written after each phase) and `results/deploy.png` (accuracy kept against speed
over the int8 teacher).
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, environment, peak_rss_of_this_process_mib, read_csv, recall, write_json
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from hf_reaugkd import KnowledgeBase, assets, editing
from hf_reaugkd.onnx_export import export_onnx
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
from hf_reaugkd.pipeline_reaugkd import ReAugKDTextClassificationPipeline

BATCH_SIZES = (32, 1)
MAX_LENGTHS = (64, 128)
# The int8 teacher first: it is what a user who wants a cheaper classifier ships without distilling (optimum's recipe:
# ONNX, dynamic int8, per-channel weights), so every speed figure is stated against it first.
TEACHERS = ("teacher ONNX int8", "teacher ONNX fp32", "teacher MiniLM-L6", "teacher mpnet-base")
STUDENTS = (
    "student PyTorch",
    "student+KB PyTorch",
    "student ONNX fp32",
    "student+KB ONNX fp32",
    "student ONNX int8",
    "student+KB ONNX int8",
    "student+1M KB ONNX fp32",
    "student+1M KB ONNX int8",
)


def prepare_models(model_dir: Path, work_dir: Path, million: int) -> dict[str, Path]:
    """Copies of the student exported over its own knowledge base, one entry of it, and `million` noisy copies of its
    keys; the source folder is left as it is."""
    folders = {"kb": work_dir / "kb", "one": work_dir / "one_entry", "million": work_dir / "million"}
    if all((folder / "onnx" / "model_quantized.onnx").is_file() for folder in folders.values()):
        return folders
    model, tokenizer = editing.load_student(model_dir)
    kb = model.knowledge_base
    generator = torch.Generator().manual_seed(0)
    repeats = torch.randint(0, kb.size, (million,), generator=generator)
    noisy = kb.keys[repeats] + 0.05 * torch.randn(million, kb.dim, generator=generator)  # (M, d): near real keys
    variants = {
        "kb": None,
        "one": KnowledgeBase.build(kb.keys[:1], kb.values[:1]),
        "million": KnowledgeBase.build(noisy, kb.values[repeats], "torch"),
    }
    for name, folder in folders.items():
        if (folder / "onnx" / "model_quantized.onnx").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
        if variants[name] is not None:
            copy, _ = editing.load_student(folder)
            copy.set_knowledge_base(variants[name])
            (folder / "knowledge_base_texts.safetensors").unlink(missing_ok=True)
            copy.config.kb_has_texts = False
            copy.save_pretrained(folder)
            model_for_export = copy
        else:
            model_for_export = model
        print(f"Exporting {folder} ...", flush=True)
        export_onnx(model_for_export, tokenizer, folder, quantize="int8")
    return folders


def teacher_graphs(teacher: Path, work_dir: Path) -> dict[str, Path]:
    """The fine-tuned teacher as a user would ship it without distilling: ONNX fp32 (`torch.onnx.export`) and int8
    (ONNX Runtime's `quantize_dynamic`, per-channel int8 weights: optimum's dynamic recipe)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = work_dir / "teacher_onnx"
    graphs = {"fp32": folder / "model.onnx", "int8": folder / "model_quantized.onnx"}
    if all(path.is_file() for path in graphs.values()):
        return graphs
    folder.mkdir(parents=True, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    example = tokenizer(["hello world"] * 3, padding="max_length", max_length=7, return_tensors="pt")
    inputs = {name: example[name] for name in ("input_ids", "attention_mask")}
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        model, (), kwargs=inputs, input_names=list(inputs), output_names=["logits"], dynamo=True,
        dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
    )  # fmt: skip
    program.save(str(graphs["fp32"]))
    quantize_dynamic(graphs["fp32"], graphs["int8"], weight_type=QuantType.QInt8, per_channel=True)
    return graphs


def onnx_session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Runtimes:
    """Every runtime of the table, loaded once; `run(name, batch)` is one timed prediction."""

    def __init__(self, names, folders: dict[str, Path], num_labels: int, threads: int):
        self.torch, self.onnx = {}, {}
        for name in names:
            if name.startswith("teacher ONNX"):
                self.onnx[name] = onnx_session(folders[f"teacher {name.split()[-1]}"], threads)
            elif name == "teacher MiniLM-L6":
                self.torch[name] = self._teacher(assets.minilm_l6_path(), num_labels)
            elif name == "teacher mpnet-base":
                self.torch[name] = self._teacher(assets.mpnet_base_path(), num_labels)
            elif name == "student PyTorch":
                self.torch[name] = editing.load_student(folders["kb"])[0]
            elif name == "student+KB PyTorch":
                self.torch[name] = self.torch.get("student PyTorch") or editing.load_student(folders["kb"])[0]
            else:
                folder = {"student": "one", "student+KB": "kb", "student+1M KB": "million"}[name.split(" ONNX")[0]]
                self.onnx[name] = ONNXTextClassificationPipeline(
                    folders[folder], quantized=name.endswith("int8"), num_threads=threads
                ).session

    @staticmethod
    def _teacher(path: Path, num_labels: int):
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels).eval()

    @torch.no_grad()
    def run(self, name: str, batch: dict[str, torch.Tensor]) -> None:
        if name in self.onnx:
            session = self.onnx[name]
            wanted = {node.name for node in session.get_inputs()}
            output = session.get_outputs()[0].name  # "logits", for the teacher and the student alike
            session.run([output], {k: v.numpy() for k, v in batch.items() if k in wanted})
        elif name == "student PyTorch":
            self.torch[name](**batch, retrieval_weight=0.0)
        elif name.startswith("teacher"):
            model = self.torch[name]
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        else:
            self.torch[name](**batch)


def timed_batches(texts: list[str], tokenizers: dict, runtime: str, batch_size: int, max_length: int, count: int):
    tokenizer = tokenizers["mpnet" if "mpnet" in runtime else "student"]
    return [
        tokenizer(
            texts[i * batch_size : (i + 1) * batch_size],
            truncation=True,
            padding="max_length",
            max_length=max_length,
            return_tensors="pt",
        )
        for i in range(count)
    ]


ONNX_RSS_PROBE = """
import sys
from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
classifier = ONNXTextClassificationPipeline({folder!r}, quantized={quantized}, num_threads={threads})
texts = {texts!r}
for max_length in (64, 128):
    classifier.tokenizer.enable_truncation(max_length)
    classifier.run(texts[:32])
    classifier.run(texts[:1])
assert "torch" not in sys.modules
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) / 1024)
"""


def peak_rss_mib(runtime: str, args, folders: dict[str, Path]) -> float:
    """Peak RSS of a fresh process that loads `runtime` alone and runs one batch at each setting. An ONNX runtime
    runs as it is served, through `ONNXTextClassificationPipeline`, in a process that never imports torch."""
    if " ONNX " in runtime and not runtime.startswith("teacher"):
        texts = [" ".join([text] * 8) for text in read_csv(args.data / "test.csv")[0][:32]]  # past 128 tokens
        folder = folders[{"student": "one", "student+KB": "kb", "student+1M KB": "million"}[runtime.split(" ONNX")[0]]]
        code = ONNX_RSS_PROBE.format(
            folder=str(folder),
            quantized=runtime.endswith("int8"),
            threads=args.threads,
            texts=texts,
        )
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, __file__, "--rss_of", runtime, *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def rss_probe(args, folders) -> None:
    torch.set_num_threads(args.threads)
    texts, labels = read_csv(args.data / "test.csv")
    runtimes = Runtimes([args.rss_of], folders, len(set(labels)), args.threads)
    tokenizers = tokenizers_for([args.rss_of], folders)
    for batch_size in BATCH_SIZES:
        for max_length in MAX_LENGTHS:
            for batch in timed_batches(texts, tokenizers, args.rss_of, batch_size, max_length, 1):
                runtimes.run(args.rss_of, batch)
    print(peak_rss_of_this_process_mib())


def tokenizers_for(names, folders) -> dict:
    found = {"student": AutoTokenizer.from_pretrained(folders["kb"])}
    if any("mpnet" in name for name in names):
        found["mpnet"] = AutoTokenizer.from_pretrained(str(assets.mpnet_base_path()))
    return found


@torch.no_grad()
def teacher_probabilities(teacher: Path, graphs: dict[str, Path], texts: list[str]) -> dict[str, np.ndarray]:
    """The teacher's class probabilities `(N, C)` on `texts` in PyTorch and in its ONNX fp32 and int8 graphs (batches of
    32, padded to the longest, truncated to the tokenizer's limit as the student's pipeline truncates)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    sessions = {f"ONNX {precision}": onnx_session(path, 2) for precision, path in graphs.items()}
    found = {"PyTorch": [], **{name: [] for name in sessions}}
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start : start + 32], padding=True, truncation=True, return_tensors="pt")
        inputs = {name: batch[name] for name in ("input_ids", "attention_mask")}
        found["PyTorch"].append(torch.softmax(model(**inputs).logits, dim=-1).numpy())
        for name, session in sessions.items():
            logits = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]
            found[name].append(torch.softmax(torch.from_numpy(logits), dim=-1).numpy())
    return {name: np.concatenate(parts) for name, parts in found.items()}


def fidelity(student_rows: list[dict], teacher: np.ndarray, labels: list[str]) -> dict[str, float]:
    """How often the student says what the teacher says (top-1 agreement) and the mean KL(teacher ‖ student) of their
    distributions, as "Does Knowledge Distillation Really Work?" (Stanton et al., NeurIPS 2021) measures fidelity."""
    student = np.array(
        [[{s["label"]: s["score"] for s in row["scores"]}[label] for label in labels] for row in student_rows]
    )
    student = np.clip(student, 1e-12, 1.0)
    kl = (teacher * (np.log(np.clip(teacher, 1e-12, 1.0)) - np.log(student))).sum(axis=1)
    return {"top1_agreement": float((student.argmax(1) == teacher.argmax(1)).mean()), "mean_kl": float(kl.mean())}


def parity(model_dir: Path, data_dir: Path, work_dir: Path, teacher: Path | None = None) -> dict:
    """fp32 ONNX against the PyTorch pipeline on every test row, int8 against fp32, accuracy of every runtime; with
    the task's fine-tuned `teacher`, its accuracy in PyTorch and ONNX fp32 / int8 and every student runtime's fidelity
    to it."""
    folder = work_dir / "kb"
    if not (folder / "onnx" / "model_quantized.onnx").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("onnx"))
        model, tokenizer = editing.load_student(folder)
        export_onnx(model, tokenizer, folder, quantize="int8")
    model, tokenizer = editing.load_student(folder)
    texts, labels = read_csv(data_dir / "test.csv")
    k = model.config.knn_k
    torch_pipeline = ReAugKDTextClassificationPipeline(model=model, tokenizer=tokenizer)
    fp32, int8 = (ONNXTextClassificationPipeline(folder, quantized=q) for q in (False, True))
    results = {}
    label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if teacher is not None:
        teacher_config = AutoConfig.from_pretrained(str(teacher))
        order = [{name: i for i, name in teacher_config.id2label.items()}[name] for name in label_names]
        probabilities = {
            name: found[:, order]
            for name, found in teacher_probabilities(teacher, teacher_graphs(teacher, work_dir), texts).items()
        }  # (N, C), in the student's label order
        reference_teacher = probabilities["PyTorch"]
        results["teacher"] = {
            f"{name} accuracy": float(
                np.mean([label_names[i] == y for i, y in zip(found.argmax(1), labels, strict=True)])
            )
            for name, found in probabilities.items()
        }
        results["teacher"] |= {
            f"{name} vs PyTorch top1_agreement": float((found.argmax(1) == reference_teacher.argmax(1)).mean())
            for name, found in probabilities.items()
            if name != "PyTorch"
        }
    for beta_name, beta in (("student", 0.0), ("student+KB", None)):
        call = {"top_k": None, "neighbors": k, "batch_size": 32}
        if beta is not None:
            call["retrieval_weight"] = beta
        reference = torch_pipeline(texts, **call)
        found = {"fp32": fp32(texts, **call), "int8": int8(texts, **call)}
        by_label = [{s["label"]: s["score"] for s in row["scores"]} for row in reference]
        entry = {
            "PyTorch accuracy": float(
                np.mean([r["scores"][0]["label"] == y for r, y in zip(reference, labels, strict=True)])
            )
        }
        for precision, rows in found.items():
            entry[f"ONNX {precision} accuracy"] = float(
                np.mean([r["scores"][0]["label"] == y for r, y in zip(rows, labels, strict=True)])
            )
        if teacher is not None:
            entry["fidelity to the teacher"] = {
                "PyTorch": fidelity(reference, reference_teacher, label_names),
                **{
                    f"ONNX {precision}": fidelity(rows, reference_teacher, label_names)
                    for precision, rows in found.items()
                },
            }
        ref_ids = [[n["id"] for n in r["neighbors"]] for r in reference]
        for precision, rows in found.items():
            ids = [[n["id"] for n in r["neighbors"]] for r in rows]
            entry[f"ONNX {precision} vs PyTorch"] = {
                "same_label_rows": int(
                    sum(
                        a["scores"][0]["label"] == b["scores"][0]["label"]
                        for a, b in zip(rows, reference, strict=True)
                    )
                ),
                "rows": len(texts),
                "max_abs_probability_difference": max(
                    abs(s["score"] - scores[s["label"]])
                    for row, scores in zip(rows, by_label, strict=True)
                    for s in row["scores"]
                ),
                "same_neighbour_ids_rows": int(sum(a == b for a, b in zip(ids, ref_ids, strict=True))),
                "neighbour_overlap": recall(torch.tensor(ids), torch.tensor(ref_ids)),
            }
        results[beta_name] = entry
    results["knn_k"] = k
    results["retrieval_weight"] = model.config.retrieval_weight
    results["retrieval_gate"] = model.config.retrieval_gate is not None
    results["kb_size"] = model.config.kb_size
    results["graph_mib"] = {p.name: p.stat().st_size / 2**20 for p in sorted((folder / "onnx").iterdir())}
    return results


def profiled_retrieval_share(
    folder: Path, quantized: bool, batches: list[dict], threads: int, work_dir: Path
) -> float:
    """Share of the graph's kernel time spent from the knowledge-base scan on, over `batches`, by ONNX Runtime's
    profiler. The scan is the node that reads the `(kb_dim, kb_size)` keys; what depends on its output is retrieval,
    found in the graph as ONNX Runtime optimized it (the names its profiler reports)."""
    import onnx
    import onnxruntime

    config = json.loads((folder / "config.json").read_text())
    source = folder / "onnx" / ("model_quantized.onnx" if quantized else "model.onnx")
    optimized = work_dir / f"{folder.name}-{source.stem}-optimized.onnx"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.enable_profiling, options.profile_file_prefix = (
        True,
        str(work_dir / f"profile-{folder.name}-{source.stem}"),
    )
    options.optimized_model_filepath = str(optimized)
    session = onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    wanted = {node.name for node in session.get_inputs()}
    for batch in batches * 3:
        session.run(["probabilities"], {k: v.numpy() for k, v in batch.items() if k in wanted})
    events = json.loads(Path(session.end_profiling()).read_text())
    graph = onnx.load(str(optimized), load_external_data=False).graph
    keys = {i.name for i in graph.initializer if list(i.dims) == [config["kb_dim"], config["kb_size"]]}
    frontier = [node for node in graph.node if keys & set(node.input)]
    retrieval = set()
    while frontier:
        node = frontier.pop()
        if node.name in retrieval:
            continue
        retrieval.add(node.name)
        frontier += [n for n in graph.node if set(node.output) & set(n.input)]
    kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in kernel)
    return sum(e["dur"] for e in kernel if e["name"].removesuffix("_kernel_time") in retrieval) / total


def million_recall(folders: dict[str, Path], texts: list[str]) -> dict[str, float]:
    """recall@16 of the int8 1M-key graph's neighbours: against the exact (fp32, every key) neighbours of the graph's
    own int8 query (what the int8 scan and its re-scoring lose), and against the fp32 student's exact neighbours (that
    and the int8 encoder's drift together)."""
    model, tokenizer = editing.load_student(folders["million"])
    int8 = ONNXTextClassificationPipeline(folders["million"], quantized=True)
    keys = model.knowledge_base.keys
    found, exact_own, exact_fp32 = [], [], []
    for start in range(0, 256, 32):
        chunk = texts[start : start + 32]
        outputs = int8.run(chunk, knn_k=16)
        found.append(torch.from_numpy(outputs["neighbor_ids"]))
        exact_own.append((torch.from_numpy(outputs["query_embedding"]) @ keys.T).topk(16, dim=1).indices)
        inputs = tokenizer(chunk, truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            query = model(**inputs, retrieval_weight=0.0).query_embedding  # (b, d): the fp32 student's query
        exact_fp32.append((query @ keys.T).topk(16, dim=1).indices)
    found = torch.cat(found)
    return {
        "int8_scan_vs_exact_for_its_query": recall(found, torch.cat(exact_own)),
        "int8_graph_vs_fp32_student_exact": recall(found, torch.cat(exact_fp32)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="A saved student (e.g. outputs/demo/model)")
    parser.add_argument("--data", type=Path, required=True, help="Its task: a folder with test.csv")
    parser.add_argument(
        "--teacher", type=Path, required=True, help="--model's fine-tuned teacher (the run's stages/teacher-<hash>)"
    )
    parser.add_argument("--parity", action="append", default=[], help="NAME=MODEL_DIR:DATA_DIR, more tasks")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="Batches of 32 per round and setting")
    parser.add_argument("--singles", type=int, default=16, help="Texts timed one at a time per round and setting")
    parser.add_argument("--million", type=int, default=1_000_000, help="Keys of the large knowledge base")
    parser.add_argument("--work_dir", type=Path, default=Path(__file__).parent / "runs" / "deploy")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "deploy.json")
    parser.add_argument("--rss_of", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="Print the table of an existing --output and stop")
    parser.add_argument(
        "--phases", default="parity,rss,timing", help="Phases to run; the others are kept from an existing --output"
    )
    args = parser.parse_args()
    if args.table:
        report = json.loads(args.output.read_text())
        plot(report, args.output.with_suffix(".png"))
        return print(markdown_table(report))
    folders = prepare_models(args.model, args.work_dir / args.data.name, args.million)
    graphs = teacher_graphs(args.teacher, args.work_dir / args.data.name)
    folders |= {f"teacher {precision}": path for precision, path in graphs.items()}
    if args.rss_of:
        return rss_probe(args, folders)

    phases = set(args.phases.split(","))
    report = (
        json.loads(args.output.read_text()) if args.output.is_file() and phases != {"parity", "rss", "timing"} else {}
    )
    report["environment"] = environment()
    report["setting"] = vars(args) | {"model": str(args.model), "data": args.data.name}
    report["setting"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["setting"].items()}
    metrics_file = args.model / "metrics.json"
    report["trained_model_metrics"] = (
        json.loads(metrics_file.read_text()).get("test") if metrics_file.is_file() else None
    )

    # 1. Parity and accuracy, per task
    tasks = [(args.data.name, args.model, args.data)]
    for value in args.parity:
        name, _, paths = value.partition("=")
        model_dir, _, data_dir = paths.partition(":")
        tasks.append((name, Path(model_dir), Path(data_dir)))
    if "parity" in phases:
        report["parity"] = {}
        for name, model_dir, data_dir in tasks:
            work = args.work_dir / args.data.name if name == args.data.name else args.work_dir / name
            report["parity"][name] = parity(
                model_dir, data_dir, work, args.teacher if name == args.data.name else None
            )
            write_json(args.output, report)
        report["million_keys_recall_at_16"] = million_recall(folders, read_csv(args.data / "test.csv")[0])
        write_json(args.output, report)

    # 2. Peak RSS, each runtime alone in a fresh process
    if "rss" in phases:
        names = (*TEACHERS, *STUDENTS)
        report["peak_rss_mib"] = {name: peak_rss_mib(name, args, folders) for name in tqdm(names, desc="Peak RSS")}
        write_json(args.output, report)
    if "timing" not in phases:
        return print(markdown_table(report))

    # 3. Timing, all runtimes in one process, interleaved in every round
    torch.set_num_threads(args.threads)
    texts, labels = read_csv(args.data / "test.csv")
    names = (*TEACHERS, *STUDENTS)
    runtimes = Runtimes(names, folders, len(set(labels)), args.threads)
    tokenizers = tokenizers_for(names, folders)
    settings = [(b, t) for b in BATCH_SIZES for t in MAX_LENGTHS]
    inputs = {
        (name, b, t): timed_batches(texts, tokenizers, name, b, t, args.batches if b > 1 else args.singles)
        for name in names
        for b, t in settings
    }
    for key, batches in inputs.items():  # warm-up: sessions' first runs allocate, int8 scan copies are made
        runtimes.run(key[0], batches[0])
    seconds = {key: [] for key in inputs}
    for _ in tqdm(range(args.rounds), desc="Timing rounds"):
        for b, t in settings:
            for name in names:
                batches = inputs[name, b, t]
                # untimed: the previous runtime's threads, still spinning, would slow this one's first run (at
                # batch 1 by up to 3x when runtimes alternate batch by batch, measured)
                runtimes.run(name, batches[0])
                start = time.perf_counter()
                for batch in batches:
                    runtimes.run(name, batch)
                seconds[name, b, t].append(time.perf_counter() - start)

    def examples(key) -> int:
        return sum(len(batch["input_ids"]) for batch in inputs[key])

    rows = []
    for b, t in settings:
        teacher_rates = {name: [examples((name, b, t)) / s for s in seconds[name, b, t]] for name in TEACHERS}
        for name in names:
            key = (name, b, t)
            rates = [examples(key) / s for s in seconds[key]]
            row = {
                "runtime": name,
                "batch_size": b,
                "max_length": t,
                "examples_per_second": statistics.median(rates),
                "examples_per_second_range": [min(rates), max(rates)],
                "ms_per_batch": 1000 * statistics.median(seconds[key]) / len(inputs[key]),
            }
            for teacher in TEACHERS:  # paired per round
                ratios = [r / q for r, q in zip(rates, teacher_rates[teacher], strict=True)]
                short = teacher.removeprefix("teacher ").replace(" ", "_")  # ONNX_int8, ..., MiniLM-L6
                row[f"speedup_vs_{short}"] = statistics.median(ratios)
                row[f"speedup_vs_{short}_range"] = [min(ratios), max(ratios)]
            plain = {"student+KB PyTorch": "student PyTorch", "student+KB ONNX fp32": "student ONNX fp32"}
            plain |= {"student+KB ONNX int8": "student ONNX int8", "student+1M KB ONNX fp32": "student ONNX fp32"}
            plain |= {"student+1M KB ONNX int8": "student ONNX int8"}
            if name in plain:
                shares = [1 - p / s for s, p in zip(seconds[key], seconds[plain[name], b, t], strict=True)]
                row["knowledge_base_share"] = statistics.median(shares)
                row["knowledge_base_share_range"] = [min(shares), max(shares)]
            if name == "student+KB ONNX fp32":
                ratios = [p / s for s, p in zip(seconds[key], seconds["student+KB PyTorch", b, t], strict=True)]
                row["speedup_vs_pytorch_student_kb"] = statistics.median(ratios)
                row["speedup_vs_pytorch_student_kb_range"] = [min(ratios), max(ratios)]
            rows.append(row)
    report["timing"] = rows
    write_json(args.output, report)
    profiled = {}
    for folder_name, label in (("kb", "student+KB"), ("million", "student+1M KB")):
        for quantized in (False, True):
            for b, t in settings:
                share = profiled_retrieval_share(
                    folders[folder_name], quantized, inputs["student PyTorch", b, t], args.threads, args.work_dir
                )
                profiled[f"{label} ONNX {'int8' if quantized else 'fp32'} batch {b} length {t}"] = share
    report["profiled_retrieval_share"] = profiled
    write_json(args.output, report)
    plot(report, args.output.with_suffix(".png"))
    print(markdown_table(report))


def runtime_accuracies(report: dict) -> dict[str, float]:
    """Test accuracy by runtime name (as the timing rows name them), of the timed task."""
    parity_of_task = report["parity"][report["setting"]["data"]]
    accuracy = {}
    for beta_name in ("student", "student+KB"):
        entry = parity_of_task[beta_name]
        accuracy[f"{beta_name} PyTorch"] = entry["PyTorch accuracy"]
        for precision in ("fp32", "int8"):
            accuracy[f"{beta_name} ONNX {precision}"] = entry[f"ONNX {precision} accuracy"]
    teacher = parity_of_task.get("teacher", {})
    for name in ("ONNX fp32", "ONNX int8"):
        if f"{name} accuracy" in teacher:
            accuracy[f"teacher {name}"] = teacher[f"{name} accuracy"]
    if "PyTorch accuracy" in teacher:
        accuracy["teacher MiniLM-L6"] = teacher["PyTorch accuracy"]  # the fine-tuned teacher of the task
    return accuracy


def markdown_table(report: dict) -> str:
    """The benchmarks README's deploy table, from the record alone (`python benchmarks/deploy.py --table`): speed
    against the int8 teacher first, then the fp32 teachers; accuracy, % of the teacher, fidelity, peak RSS."""
    accuracy = runtime_accuracies(report)
    teacher_accuracy = accuracy.get("teacher MiniLM-L6")
    fidelity_of = {}
    for beta_name in ("student", "student+KB"):
        for runtime, found in (
            report["parity"][report["setting"]["data"]][beta_name].get("fidelity to the teacher", {}).items()
        ):
            fidelity_of[f"{beta_name} {runtime}"] = found
    lines = [
        "| runtime | batch | length | examples/s | × int8 teacher | × MiniLM-L6 PyTorch | × mpnet-base PyTorch "
        "| test accuracy | % of teacher | agreement with teacher | KL(teacher ‖ ·) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["timing"]:
        name = row["runtime"]
        found = fidelity_of.get(name)
        cells = [
            name,
            str(row["batch_size"]),
            str(row["max_length"]),
            f"{row['examples_per_second']:.1f}",
            f"**{row['speedup_vs_ONNX_int8']:.2f}** ({row['speedup_vs_ONNX_int8_range'][0]:.2f}–"
            f"{row['speedup_vs_ONNX_int8_range'][1]:.2f})",
            f"{row['speedup_vs_MiniLM-L6']:.2f}",
            f"{row['speedup_vs_mpnet-base']:.2f}",
            "" if name not in accuracy else f"{100 * accuracy[name]:.2f}",
            "" if name not in accuracy or not teacher_accuracy else f"{100 * accuracy[name] / teacher_accuracy:.1f}%",
            "" if found is None else f"{100 * found['top1_agreement']:.1f}%",
            "" if found is None else f"{found['mean_kl']:.3f}",
            f"{report['peak_rss_mib'][name]:.0f} MiB" if name in report.get("peak_rss_mib", {}) else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path, goal_speed: float = 3.0, goal_kept: float = 97.0) -> None:
    """Accuracy kept (% of the teacher) against speed over the int8 teacher (batch 32, length 128), one point per
    runtime, the goal region shaded."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = runtime_accuracies(report)
    teacher_accuracy = accuracy["teacher MiniLM-L6"]
    points = {
        row["runtime"]: (row["speedup_vs_ONNX_int8"], 100 * accuracy[row["runtime"]] / teacher_accuracy)
        for row in report["timing"]
        if row["batch_size"] == 32 and row["max_length"] == 128 and row["runtime"] in accuracy
    }
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.fill_between([goal_speed, 100], goal_kept, 101, color="tab:green", alpha=0.12, label="goal")
    for i, (name, (speed, kept)) in enumerate(sorted(points.items(), key=lambda item: item[1])):
        axes.scatter(speed, kept, color="tab:orange" if name.startswith("teacher") else "tab:blue")
        offset = (4, 6) if i % 2 else (4, -10)  # neighbours' labels alternate above and below
        axes.annotate(name.replace("teacher MiniLM-L6", "teacher PyTorch"), (speed, kept), fontsize=7, xytext=offset,
                      textcoords="offset points")  # fmt: skip
    axes.set_xscale("log")
    ticks = [0.25, 0.5, 1, 2, 3, 4, 8]
    axes.set_xticks(ticks, [f"{tick:g}×" for tick in ticks])
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes.set_xlim(min(x for x, _ in points.values()) * 0.7, max(goal_speed, *(x for x, _ in points.values())) * 2)
    axes.set_ylim(min(y for _, y in points.values()) - 2, 101)
    axes.set_xlabel("throughput over the teacher in ONNX int8 (batch 32, length 128, 2 threads)")
    axes.set_ylabel("test accuracy, % of the teacher's")
    axes.set_title(f"{report['setting']['data']}: what distilling buys over quantizing the teacher")
    axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
