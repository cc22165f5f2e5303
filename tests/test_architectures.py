"""Every encoder architecture users distil with, as teacher and as (truncated) student, and a decoder LLM as teacher:
the whole pipeline on tiny random models built here, then the saved students loaded in a fresh process without
hf-reaugkd."""

import json

import pytest
import torch
from conftest import encoder_config, llm_tokenizer, pipeline_args, run_fresh_python, tiny_llama, write_task
from transformers import AutoModel

from hf_reaugkd.distill import main
from hf_reaugkd.teacher import load_teacher, teacher_batches

ARCHITECTURES = ("bert", "distilbert", "roberta", "deberta-v2", "mpnet", "modernbert")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_tokenizer):
    """Each encoder architecture as teacher and as student of itself, and a Llama teacher into a BERT student."""
    root = tmp_path_factory.mktemp("architectures")
    write_task(root)
    for architecture in ARCHITECTURES:
        torch.manual_seed(0)
        folder = root / architecture
        AutoModel.from_config(encoder_config(architecture, tiny_tokenizer.vocab_size)).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        main(pipeline_args(root, folder / "out", "--teacher_model_name_or_path", str(folder),
                           "--student_model_name_or_path", str(folder)))  # fmt: skip
    tokenizer = llm_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    main(pipeline_args(root, root / "llama" / "out", "--teacher_model_name_or_path", str(root / "llama"),
                       "--student_model_name_or_path", str(root / "bert")))  # fmt: skip
    return root


@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "llama"])
def test_every_architecture_distils_and_saves_a_student(distilled, architecture):
    model_dir = distilled / architecture / "out" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    student_type = "bert" if architecture == "llama" else architecture
    assert config["encoder_config"]["model_type"] == student_type
    layer_types = config["encoder_config"].get("layer_types")
    assert layer_types is None or layer_types == ["full_attention"]  # ModernBERT's first layer, kept as it was
    metrics = json.loads((distilled / architecture / "out" / "metrics.json").read_text())
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["splits"]["test"].values())


def test_every_saved_student_serves_in_a_fresh_process_without_the_package(distilled):
    names = [*ARCHITECTURES, "llama"]
    got = run_fresh_python(
        f"""
        import json
        from transformers import AutoModel, pipeline
        results = {{}}
        for name in {names!r}:
            path = {str(distilled)!r} + "/" + name + "/out/model"
            classifier = pipeline("text-classification", model=path, trust_remote_code=True)
            base = AutoModel.from_pretrained(path, trust_remote_code=True)
            rows = classifier(["the movie was great fun", "awful boring plot"], neighbors=2)
            results[name] = [type(base).__name__, [row["label"] for row in rows], [len(row["neighbors"]) for row in rows]]
        print(json.dumps(results))
        """,
        distilled,
    )
    for name in names:
        base_class, labels, neighbors = got[name]
        assert base_class == "ReAugKDModel" and set(labels) <= {"negative", "positive"}
        assert all(1 <= n <= 2 for n in neighbors)  # up to the k chosen on validation


def test_a_decoder_teacher_pads_with_its_end_token_and_keys_come_from_the_last_real_token(distilled):
    teacher, tokenizer = load_teacher(distilled / "llama")
    assert tokenizer.pad_token == "</s>" and teacher.config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    texts = ["great actor", "the movie was good and long"]
    from datasets import Dataset

    encoded = Dataset.from_dict(dict(tokenizer(texts)))
    (_, embeddings), = teacher_batches(teacher.eval(), tokenizer, encoded, batch_size=2)  # fmt: skip
    with torch.no_grad():
        for row, text in enumerate(texts):  # each text alone, unpadded: its last token's last-layer state
            alone = teacher(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1]
            if row == 1:  # the longest row has no padding: the batch computed exactly the same positions
                torch.testing.assert_close(embeddings[row], alone[0, -1], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(embeddings[row], alone[0].mean(dim=0), atol=1e-3)  # not mean-pooled
