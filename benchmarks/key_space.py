"""What the knowledge base's vote is made of: the geometry of the key space and where the student's queries land.

    python benchmarks/quality.py --task rotten_tomatoes=PATH/rotten_tomatoes ...   # trains and saves the students
    python benchmarks/key_space.py --run_dir benchmarks/runs/quality/SETTING/rotten_tomatoes+labeled4000 \
        --data benchmarks/runs/quality/data/rotten_tomatoes-HASH-labeled4000

For each saved ReAugKD student of `quality.py` (`--variants`, every seed folder of `--run_dir`):
- **class collapse**: the mean cosine between knowledge-base keys of the same teacher class, and between keys of
  different classes; the same for the teacher's own sentence embeddings the keys are projected from (a fine-tuned
  classifier's embeddings collapse towards one point per class, and the supervised contrastive head does too);
- **alignment**: the cosine between the student's query and the teacher's own key of the same text (the teacher
  embedding through the checkpoint's `teacher_projection.safetensors`), and the share of the teacher query's 8
  nearest knowledge-base rows that the student's query also retrieves;
- the kNN accuracy (β = 1, k = 8, the model's τ_r) of both queries.
Alignment and kNN accuracy are measured on validation and on test: a diagnosis, nothing here is chosen.
Where the classes have collapsed, any query in the right cluster votes for the right class: the vote is then a class
vote, not the labels of this text's neighbours. Teacher embeddings come from the run's cached teacher outputs (the
stage whose train embeddings project onto the knowledge base's first keys). Results: `results/key_space_TASK.json`.
"""

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, environment, write_json
from retrieval_settings import saved_students, tokenized_split

from hf_reaugkd.data import load_task_data
from hf_reaugkd.evaluation import knn_accuracy, predict
from hf_reaugkd.saving import TEACHER_PROJECTION
from hf_reaugkd.teacher import load_projection, project

NEIGHBORS = 8


def class_cosines(vectors: torch.Tensor, classes: torch.Tensor, sample: int = 2000) -> tuple[float, float]:
    """Mean cosine within a class (averaged over classes) and between classes, on up to `sample` rows per class."""
    vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
    groups = [vectors[classes == c][:sample] for c in classes.unique()]
    within = statistics.mean((g @ g.T).mean().item() for g in groups)
    between = statistics.mean((a @ b.T).mean().item() for a, b in itertools.combinations(groups, 2))
    return within, between


def transfer_embeddings(stages: Path, projection, knowledge_base) -> tuple[Path, np.ndarray]:
    """The cached teacher outputs the knowledge base was made from, and their embeddings in its row order (train,
    then unlabelled): the stage with as many rows whose train embeddings project onto its first keys."""
    for folder in sorted(stages.glob("teacher-outputs-*")):
        parts = [folder / f"{name}-embeddings.npy" for name in ("train", "unlabeled")]
        parts = [np.load(part, mmap_mode="r") for part in parts if part.exists()]
        if not parts or sum(len(part) for part in parts) != knowledge_base.size:
            continue
        if torch.allclose(project(projection, parts[0][:16]), knowledge_base.keys[:16], atol=1e-4):
            return folder, np.concatenate(parts)
    raise SystemExit(f"No teacher outputs in {stages} produce this knowledge base's keys.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="quality.py's folder of one task (seed* inside)")
    parser.add_argument(
        "--data", type=Path, required=True, help="The task's data folder (train, validation and test CSVs)"
    )
    parser.add_argument("--variants", nargs="+", default=["reaugkd", "reaugkd_own_key", "reaugkd_relational_own_key"])
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--output", type=Path, help="Default: results/key_space_TASK.json")
    args = parser.parse_args()
    output = args.output or RESULTS_DIR / f"key_space_{args.run_dir.name.split('+')[0]}.json"

    splits = ("train", "validation", "test")
    data = load_task_data(data_files={name: str(args.data / f"{name}.csv") for name in splits})
    records = []
    for seed, variant, model_dir, model, tokenizer in saved_students(args.run_dir, args.variants):
        knowledge_base = model.knowledge_base
        projection = load_projection(model_dir / TEACHER_PROJECTION)
        outputs, embeddings = transfer_embeddings(args.run_dir / seed / "stages", projection, knowledge_base)
        temperature = model.config.retrieval_temperature
        per_split = {}
        for name in ("validation", "test"):
            split = tokenized_split(data, name, model, tokenizer, args.max_seq_length)
            predicted = predict(model, split, tokenizer, [NEIGHBORS], temperature)
            teacher_queries = project(projection, np.load(outputs / f"{name}-embeddings.npy"))  # (n, d)
            student_ids = knowledge_base.search(predicted.queries, NEIGHBORS)[1]  # (n, 8)
            teacher_ids = knowledge_base.search(teacher_queries, NEIGHBORS)[1]  # (n, 8)
            shared = (student_ids.unsqueeze(2) == teacher_ids.unsqueeze(1)).any(2).float().mean().item()
            per_split |= {
                f"{name}_query_to_own_teacher_key_cosine": (predicted.queries * teacher_queries).sum(-1).mean().item(),
                f"{name}_shared_neighbors_at_8": shared,
                f"{name}_knn_accuracy_student_query": knn_accuracy(
                    knowledge_base, predicted.queries, predicted.labels, [NEIGHBORS], temperature
                )[NEIGHBORS],
                f"{name}_knn_accuracy_teacher_query": knn_accuracy(
                    knowledge_base, teacher_queries, predicted.labels, [NEIGHBORS], temperature
                )[NEIGHBORS],
            }
        teacher_classes = knowledge_base.values.argmax(-1)  # (N,)
        key_within, key_between = class_cosines(knowledge_base.keys, teacher_classes)
        embedding_within, embedding_between = class_cosines(torch.from_numpy(embeddings), teacher_classes)
        records.append(
            {
                "seed": seed,
                "variant": variant,
                "key_cosine_within_class": key_within,
                "key_cosine_between_classes": key_between,
                "teacher_embedding_cosine_within_class": embedding_within,
                "teacher_embedding_cosine_between_classes": embedding_between,
                **per_split,
            }
        )
        print({key: round(value, 4) if isinstance(value, float) else value for key, value in records[-1].items()})
        write_json(output, {"environment": environment(), "run_dir": str(args.run_dir), "records": records})

    variants = [v for v in args.variants if any(r["variant"] == v for r in records)]
    print(f"\nmean over seeds {'':29s}" + "".join(f"{variant:>28s}" for variant in variants))
    for metric in list(records[0])[2:]:
        means = [statistics.mean(r[metric] for r in records if r["variant"] == variant) for variant in variants]
        print(f"{metric:45s}" + "".join(f"{value:28.3f}" for value in means))


if __name__ == "__main__":
    main()
