import math

import pytest
import torch

from fastllm import models
from fastllm.data import SFTDataset, load_instructions
from fastllm.tokenizer import load_tokenizer
from fastllm.train import sft
from fastllm.train.build import pack_examples
from fastllm.train.common import CausalLMLoss
from fastllm.train.logging import read_metrics

from .conftest import tiny

RECORDS = load_instructions()[:80]


def test_packed_examples_do_not_see_each_other(tok_dir):
    """The loss of a packed row equals that of the same examples right-padded in a batch."""
    tok = load_tokenizer(tok_dir)
    data = SFTDataset(RECORDS[:6], tok, max_length=128)
    items = [data[i] for i in range(6)]
    torch.manual_seed(0)
    module = CausalLMLoss(models.build_model(models.preset("tiny-llama", vocab_size=tok.vocab_size)))
    padded = data.collate(items)
    packed = pack_examples(items)
    assert packed["input_ids"].shape == (1, sum(it["input_ids"].numel() for it in items))
    loss_padded = module(padded["input_ids"], padded["labels"], attention_mask=padded["attention_mask"])
    loss_packed = module(**packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())


@pytest.mark.parametrize("packing", [True, False])
def test_sft_learns(tmp_path, tok_dir, packing):
    result = sft(tiny(tok_dir, tmp_path, max_length=128, max_steps=8, packing=packing), records=RECORDS)
    losses = read_metrics(tmp_path / "metrics.jsonl")
    assert losses[8] < losses[1] - 0.3, losses
    assert math.isfinite(result["eval_loss"])
    assert models.from_pretrained(tmp_path / "final").config.vocab_size == 400


def test_selected_layers_only(tmp_path, tok_dir):
    torch.manual_seed(0)
    model = models.build_model(models.preset("tiny-llama", vocab_size=400, num_hidden_layers=3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = sft(tiny(tok_dir, tmp_path, max_length=128, max_steps=3, train_layers="1:2", freeze=["*.mlp.*"]),
                 model=model, records=RECORDS)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(n.startswith("model.layers.1.") and ".mlp." not in n for n in changed), changed
    assert result["trainable_params"] == sum(before[n].numel() for n in before
                                             if n.startswith("model.layers.1.") and ".mlp." not in n)


def test_too_long_and_empty(tmp_path, tok_dir):
    with pytest.raises(ValueError, match=r"records\[\d+\]: max_length: the example has"):
        sft(tiny(tok_dir, tmp_path, max_length=16), records=RECORDS)
    with pytest.raises(ValueError, match="data: empty dataset"):
        sft(tiny(tok_dir, tmp_path), records=[])
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        sft(tiny(tok_dir, tmp_path, max_length=512), records=RECORDS)


def test_lora_trains_only_adapters_and_saves_only_them(tmp_path, tok_dir):
    from safetensors.torch import load_file

    from fastllm import peft
    from fastllm.train.checkpoint import list_checkpoints, load_checkpoint

    torch.manual_seed(0)
    model = models.build_model(models.preset("tiny-llama", vocab_size=400))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    result = sft(tiny(tok_dir, tmp_path, max_length=128, max_steps=4, save_every=2, peft=spec),
                 model=model, records=RECORDS)
    for n, p in model.named_parameters():
        if n in before:  # base weights untouched
            assert torch.equal(before[n], p.detach()), n
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora" in n for n in adapters)
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert set(ckpt["model"]) == adapters
    final = tmp_path / "final"
    assert not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert 0 < len(saved) == len(adapters)
    # the saved adapter reproduces the trained model's outputs on a fresh base
    torch.manual_seed(0)
    fresh = models.build_model(models.preset("tiny-llama", vocab_size=400))
    peft.load_adapter(fresh, final)
    ids = torch.randint(0, 400, (1, 16))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_lora_resume_after_checkpoint(tmp_path, tok_dir):
    """Stop after 2 of 4 steps, resume: the remaining losses equal an uninterrupted run's."""
    spec = {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}

    def run(out, steps, **kw):
        torch.manual_seed(0)
        model = models.build_model(models.preset("tiny-llama", vocab_size=400))
        sft(tiny(tok_dir, out, max_length=128, max_steps=steps, peft=spec, eval_batches=0, **kw),
            model=model, records=RECORDS)
        return read_metrics(out / "metrics.jsonl")

    full = run(tmp_path / "full", 4)
    run(tmp_path / "cut", 2)  # leaves a checkpoint at step 2
    resumed = run(tmp_path / "cut", 4)
    assert resumed == full
