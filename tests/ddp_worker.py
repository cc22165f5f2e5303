"""One SGD step of ReAugKDTrainer on a fixed batch, run alone or under `torchrun` (see test_trainer.py).
Writes the world size, the logged loss and the parameter update to the JSON file given as argv[1]."""

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import SequentialSampler

sys.path.insert(0, str(Path(__file__).parent))
from conftest import dropout_free_student, tiny_distillation_data  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

from hf_reaugkd.trainer import ReAugKDTrainer  # noqa: E402
from hf_reaugkd.training_args import ReAugKDTrainingArguments  # noqa: E402


class SequentialTrainer(ReAugKDTrainer):
    """Examples in order, so that which example lands in which (micro-)batch is known."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def one_step(
    output: str, per_device_batch_size: int, accumulation: int = 1, relational_weight: float = 1.0, rows=None
):
    from conftest import WORDS

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    data = tiny_distillation_data(tokenizer)
    data = data.select(rows) if rows is not None else data
    model = dropout_free_student()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    args = ReAugKDTrainingArguments(
        output_dir=str(Path(output).parent / "trainer"),
        per_device_train_batch_size=per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        ce_weight=1.0,
        relational_weight=relational_weight,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SequentialTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    if trainer.is_world_process_zero():
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        Path(output).write_text(
            json.dumps(
                {
                    "world_size": trainer.args.world_size,
                    "loss": losses[0]["loss"],
                    "loss_relational": losses[0].get("loss_relational"),
                    "update": (after - before).tolist(),
                }
            )
        )


if __name__ == "__main__":
    one_step(sys.argv[1], int(sys.argv[2]))
    if torch.distributed.is_initialized():  # an open gloo group can abort the process as it exits
        torch.distributed.destroy_process_group()
