"""Tiny random transformers models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os
import random
import warnings
import zlib

import pytest
import torch
from torch import nn

# GRAFTKIT_TEST_DEVICE=cuda (scripts/gpu_check.sh) moves the device-agnostic tests there: the tiny models and token
# batches below are built on that device, and random values are still drawn on the CPU from seeded generators.
DEVICE = torch.device(os.environ.get("GRAFTKIT_TEST_DEVICE", "cpu"))

# The bound on a subprocess a test starts: only a hung one reaches it. An hour, since the suite must pass on a
# loaded machine where a few steps of a real model can take many minutes; no test's outcome depends on speed.
HUNG_AFTER_S = 3600

warnings.filterwarnings("ignore", message=".*eos_token_id.*")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval().to(DEVICE)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval().to(DEVICE)


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=num_labels, max_position_embeddings=32)).eval().to(DEVICE)


def tiny_t5(seed: int = 0) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)).eval().to(DEVICE)


class TinyConvNet(nn.Module):
    """A small non-transformers model: LoRA must work on plain nn.Modules too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1x1(torch.relu(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval().to(DEVICE)


def token_batch(seed: int = 1, batch: int = 2, length: int = 7, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    return {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE)}


def randomize_adapters(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    """Give every adapter tensor non-zero random values (a zero B would hide a failed load)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name or "adaption_gate" in name:  # IA3 scales (ones) and adaption-prompt gates (zeros): shift
                param.add_((torch.randn(param.shape, generator=g) * std).to(param.device, param.dtype))
            elif "lora_" in name or "modules_to_save" in name:
                noise = (torch.randn(param.shape, generator=g) * std).to(param.device)
                if "magnitude" in name or "modules_to_save" in name:
                    param.add_(noise.to(param.dtype))
                else:
                    param.copy_(noise.to(param.dtype))


def check_mixed_rows(model: nn.Module, inputs, names: list[str]) -> torch.Tensor:
    """Run a mixed-adapter batch (one adapter name per row, ``"__base__"`` for none) and check that each row equals
    the same input run with that adapter alone (or disabled); returns the mixed logits."""
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = run(model, inputs)
        else:
            model.set_adapter(name)
            expected = run(model, inputs)
        torch.testing.assert_close(mixed[row], expected[row], rtol=1e-5, atol=1e-6)
    return mixed


def train_steps(model: nn.Module, inputs: dict[str, torch.Tensor], optimizer, steps: int) -> list[float]:
    """``steps`` optimizer steps on the causal-LM loss of ``inputs`` (labels: the input ids); the losses seen."""
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            return model(inputs.to(DEVICE))
        out = model(**inputs)
        return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(autouse=True)
def _own_seed(request):
    """Every test starts torch's and Python's global generators from a seed of its own (from its id), so code that
    draws from them (HF peft's initialisation, dropout) gives the same values whatever ran before."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.fixture
def tmp_dir(tmp_path):
    return str(tmp_path)
