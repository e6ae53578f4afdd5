"""DeepSpeed ZeRO-3 on CPU (gloo): the base is built partitioned under ``zero.Init``, graftkit wraps it (its own
modules built under ``zero.Init`` too), the engine trains a LoRA adapter, every rank takes part in the save.

Usage (2 processes): python -m torch.distributed.run --nproc_per_node 2 zero3_lora.py OUT STEPS inside|outside
(inside: get_peft_model runs under zero.Init too; outside: after it, as transformers loads a model for ZeRO-3)
Rank 0 writes OUT/adapter (the adapter), OUT/base.safetensors (the full base weights, gathered), OUT/result.json
(the losses) and OUT/logits.safetensors (the engine's logits on the batch after training, and those of the loading
checks: the adapter reloaded onto a fresh partitioned base, its base alone, its B zeroed in place, and the adapter
loaded a second time into the trained engine).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import deepspeed
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import graftkit

warnings.filterwarnings("ignore")
out, steps, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lora = graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
# DeepSpeed's CPU shared-memory collectives are a C++ extension compiled on first use (both ranks at once, racing);
# plain gloo collectives are what this test needs.
deepspeed.comm.torch.build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every tensor partitioned
          "optimizer": {"type": "AdamW", "params": {"lr": 2e-2, "weight_decay": 0.0, "torch_adam": True}}}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=config):
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=False))
    assert base.model.layers[0].self_attn.q_proj.weight.numel() == 0, "zero.Init did not partition the base"
    if where == "inside":  # graftkit's modules built under zero.Init too (it reads attributes before __init__ runs)
        model = graftkit.get_peft_model(base, lora)
if where == "outside":  # transformers' way: the base loaded under zero.Init, the adapter added after
    model = graftkit.get_peft_model(base, lora)
lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
with deepspeed.zero.GatheredParameters(lora_b, modifier_rank=None):
    b_zero_at_start = all(bool((p == 0).all()) and p.numel() > 0 for p in lora_b)  # the model starts as the base
engine, *_ = deepspeed.initialize(model=model, config=config,
                                  model_parameters=[p for p in model.parameters() if p.requires_grad])
batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
losses = []
for _ in range(steps):
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
# Saved straight after the last step, as a trainer saves: every adapter tensor is a partition then.
assert all(p.numel() == 0 for n, p in model.named_parameters() if "lora_" in n), "ZeRO-3 did not partition LoRA"
model.save_pretrained(os.path.join(out, "adapter"), is_main_process=rank == 0)  # every rank gathers
engine.eval()
with torch.no_grad():
    logits = engine(input_ids=batch).logits
with deepspeed.zero.GatheredParameters(list(base.parameters()), modifier_rank=None):
    whole = {k: v.detach().clone() for k, v in graftkit.get_base_model_state_dict(model).items()}

# Loading into partitioned models. (1) The saved adapter onto a fresh partitioned base (inside: the adapter itself
# built under zero.Init, so the file is written into partitions), run by an inference engine.
dist = {k: v for k, v in config.items() if k != "optimizer"}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=config):
    fresh = LlamaForCausalLM(base.config)
    if where == "inside":
        loaded = graftkit.PeftModel.from_pretrained(fresh, os.path.join(out, "adapter"))
if where == "outside":
    loaded = graftkit.PeftModel.from_pretrained(fresh, os.path.join(out, "adapter"))
engine2, *_ = deepspeed.initialize(model=loaded, config=dist)
engine2.eval()
with torch.no_grad():
    reloaded = engine2(input_ids=batch).logits
    with loaded.disable_adapter():
        base_logits = engine2(input_ids=batch).logits
# (2) Tensors written into an adapter the engine partitioned: zeroed B gives the base model's logits.
assert all(p.numel() == 0 for n, p in loaded.named_parameters() if "lora_" in n)
saved = graftkit.get_peft_model_state_dict(loaded)
graftkit.set_peft_model_state_dict(loaded, {k: v * 0 if "lora_B" in k else v for k, v in saved.items()})
with torch.no_grad():
    zeroed = engine2(input_ids=batch).logits
# (3) A second adapter loaded into the trained engine's model, made active: the trained logits again.
model.load_adapter(os.path.join(out, "adapter"), adapter_name="again")
model.set_adapter("again")
with torch.no_grad():
    again = engine(input_ids=batch).logits
if rank == 0:
    save_file({k: v.contiguous() for k, v in whole.items()}, os.path.join(out, "base.safetensors"))
    save_file({"logits": logits.contiguous(), "reloaded": reloaded.contiguous(), "base": base_logits.contiguous(),
               "zeroed": zeroed.contiguous(), "again": again.contiguous()}, os.path.join(out, "logits.safetensors"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"losses": losses, "b_zero_at_start": b_zero_at_start}, f)
