"""The causal Fastformer under transformers.Trainer, on real text from the data bundle."""

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from attnfree import FastformerConfig, FastformerForCausalLM


class ByteBlocks(Dataset):
    """Consecutive blocks of UTF-8 bytes (ids 0..255), labels == input_ids (the model shifts)."""

    def __init__(self, data: bytes, block: int):
        ids = torch.tensor(list(data), dtype=torch.long)
        self.blocks = ids[: len(ids) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def test_trainer_loss_decreases_and_model_reloads(data_dir, tmp_path):
    text = (data_dir / "tinyshakespeare" / "input.txt").read_bytes()[:60_000]
    config = FastformerConfig(hidden_size=64, n_heads=4, num_hidden_layers=2, vocab_size=256, n_positions=64,
                              convolve=True, hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=10,
                              eos_token_id=10)
    model = FastformerForCausalLM(config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=10, save_steps=60,
                             report_to=[], seed=0, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ByteBlocks(text, 64))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0, losses  # from ~5.5 nats (uniform over bytes) toward ~2.5
    loaded = FastformerForCausalLM.from_pretrained(tmp_path / "checkpoint-60").eval()
    prompt = torch.tensor([list(b"ROMEO:")])
    sample = loaded.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)  # (eos is the newline byte)
    assert sample.shape == (1, 26)
