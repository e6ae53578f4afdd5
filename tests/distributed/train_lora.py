"""Trains LoRA on a tiny Llama for a few steps and saves the adapter from rank 0.

    python tests/distributed/train_lora.py single OUT STEPS
    torchrun --nproc_per_node 2 tests/distributed/train_lora.py {ddp,fsdp} OUT STEPS
    accelerate launch --cpu --num_processes 2 tests/distributed/train_lora.py accelerate OUT STEPS

Every mode sees the same global batch of 8 rows (each of 2 ranks takes 4), so after the same number of steps
the adapters must agree with the single-process run.
"""

from __future__ import annotations

import faulthandler
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import graftkit

warnings.simplefilter("ignore")


def main() -> None:
    faulthandler.dump_traceback_later(100, exit=True)  # a hung collective fails with every thread's stack
    mode, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank, world = 0, 1
    if mode in ("ddp", "fsdp"):
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2))
    model = graftkit.get_peft_model(base, graftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    rows = 8 // world
    local = ids[rank * rows : (rank + 1) * rows]
    runner = model
    accelerator = None
    if mode == "accelerate":  # launched with `accelerate launch --num_processes 2 --cpu`: DDP through Accelerator
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        rank, world = accelerator.process_index, accelerator.num_processes
        rows = 8 // world
        local = ids[rank * rows : (rank + 1) * rows]
    if mode == "ddp":
        runner = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:  # frozen base and trainable adapters in one unit
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if accelerator is not None:
        runner, opt = accelerator.prepare(model, opt)
    for _ in range(steps):
        loss = runner(input_ids=local, labels=local).loss
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
    if accelerator is not None:
        accelerator.unwrap_model(runner).save_pretrained(out_dir, is_main_process=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    else:
        model.save_pretrained(out_dir, is_main_process=rank == 0)


if __name__ == "__main__":
    from launch import run_and_exit

    run_and_exit(main)
