"""A web demo of a distilled student, the way a Hugging Face Space runs one (Gradio).

    pip install "hf-reaugkd[app]"
    python examples/app.py MODEL_DIR [--port 7860]

Type a text to see the prediction, the student's own and the retrieved label distributions, and the knowledge-base
neighbours behind it with their texts and weights. Then add the text to the knowledge base with a label and watch the
prediction change; removing it restores the prediction. Edits go through `hf_reaugkd.editing`, so each one rewrites
MODEL_DIR atomically (and exports its ONNX graph again, if it has one). The app listens on 127.0.0.1 only: it writes
to the model folder, which no one else should reach.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402 (after the setting above)

from hf_reaugkd import editing  # noqa: E402
from hf_reaugkd.errors import InputError  # noqa: E402
from hf_reaugkd.pipeline_reaugkd import ReAugKDTextClassificationPipeline, max_input_length  # noqa: E402

NEIGHBORS = 5
NEIGHBOR_COLUMNS = ["kb row", "similarity", "weight", "label", "text"]


class Student:
    """The served student, loaded again after every edit of its folder."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.reload()

    def reload(self) -> None:
        model, tokenizer = editing.load_student(self.model_dir)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.tokenizer, self.max_tokens = tokenizer, max_input_length(model.config, tokenizer)
        self.classify = ReAugKDTextClassificationPipeline(model=model, tokenizer=tokenizer)


def build_app(model_dir: str | Path) -> gr.Blocks:
    student = Student(Path(model_dir))

    def predict(text: str):
        if not text or not text.strip():
            return "", {}, {}, [], "Type a text first."
        result = student.classify(text, neighbors=NEIGHBORS)
        result = result[0] if isinstance(result, list) else result
        rows = [
            [n["id"], round(n["similarity"], 3), round(n["weight"], 3), n["label"], n.get("text", "")]
            for n in result["neighbors"]
        ]
        tokens = len(student.tokenizer(text)["input_ids"])
        note = (
            f"The text is {tokens:,} tokens long: the student read its first {student.max_tokens}."
            if tokens > student.max_tokens
            else ""
        )
        return (
            f"{result['label']} ({result['score']:.3f})",
            result["student_scores"],
            result["retrieved_scores"],
            rows,
            note,
        )

    # A session remembers what it added by content, (text, label): row ids shift when another session removes a row.
    def add(text: str, label: str, added: list[list[str]]):
        try:
            if not text or not text.strip():
                raise InputError("Type a text to add.")
            ids = editing.add_texts(student.model_dir, [text], [label])
        except (InputError, ValueError) as err:
            return (*predict(text)[:4], f"Not added: {err}", added)
        student.reload()
        return (*predict(text)[:4], f"Added as knowledge-base row {ids[0]} ({label}).", [*added, [text, label]])

    def remove(text: str, added: list[list[str]]):
        if not added:
            return (*predict(text)[:4], "Nothing added in this session to remove.", added)
        try:
            removed = editing.remove_rows(student.model_dir, texts_with_labels=[tuple(row) for row in added])
        except (InputError, ValueError) as err:
            return (*predict(text)[:4], f"Not removed: {err}", added)
        student.reload()
        gone = len(added) - len(removed)
        note = f"; {gone} were no longer there" if gone else ""
        return (*predict(text)[:4], f"Removed this session's rows ({len(removed)}{note}).", [])

    with gr.Blocks(title="hf-reaugkd: a student that retrieves") as app:
        gr.Markdown(
            "## A distilled student that retrieves from its teacher's knowledge base\n"
            "The prediction mixes the student's own distribution with its nearest teacher neighbours' soft labels."
        )
        text = gr.Textbox(label="text", lines=3, elem_id="text")
        classify = gr.Button("Predict", elem_id="predict")
        prediction = gr.Textbox(label="prediction", interactive=False, elem_id="prediction")
        with gr.Row():
            student_scores = gr.Label(label="the student alone")
            retrieved_scores = gr.Label(label="retrieved from the knowledge base")
        neighbors = gr.Dataframe(headers=NEIGHBOR_COLUMNS, label="neighbours", elem_id="neighbors", interactive=False)
        with gr.Row():
            label = gr.Dropdown(
                student.labels, value=student.labels[0], label="label", allow_custom_value=True, elem_id="label"
            )
            add_button = gr.Button("Add to the knowledge base", elem_id="add")
            remove_button = gr.Button("Remove what I added", elem_id="remove")
        message = gr.Markdown(elem_id="message")
        added = gr.State([])
        outputs = [prediction, student_scores, retrieved_scores, neighbors, message]
        classify.click(predict, text, outputs)
        text.submit(predict, text, outputs)
        add_button.click(add, [text, label, added], [*outputs, added])
        remove_button.click(remove, [text, added], [*outputs, added])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a saved student (hf-reaugkd distill's output_dir/model)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    build_app(args.model_dir).launch(server_name="127.0.0.1", server_port=args.port)


if __name__ == "__main__":
    main()
