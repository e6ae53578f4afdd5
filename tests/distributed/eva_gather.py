"""EVA's data pass on a tiny Llama: one process on whole batches, or 2 gloo processes each on half of every batch.

    python tests/distributed/eva_gather.py single OUT
    torchrun --nproc_per_node 2 tests/distributed/eva_gather.py ddp OUT

Each process saves ``eva-<mode>-<rank>.safetensors`` (the directions with inputs gathered across processes) and, under
torchrun, ``eva-local-<rank>.safetensors`` (each process on its own rows), from ``get_eva_state_dict``.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import graftkit

warnings.simplefilter("ignore")


def main() -> None:
    faulthandler.dump_traceback_later(100, exit=True)  # a hung collective fails with every thread's stack
    mode, out_dir = sys.argv[1], sys.argv[2]
    rank, world = 0, 1
    if mode == "ddp":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2))
    config = graftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights="eva", eva_config=graftkit.EvaConfig(rho=2.0, tau=0.9))
    ids = torch.randint(0, 64, (6, 8, 10), generator=torch.Generator().manual_seed(1))  # 6 batches of 8 rows
    rows = 8 // world
    batches = [{"input_ids": batch[rank * rows: (rank + 1) * rows]} for batch in ids]
    os.makedirs(out_dir, exist_ok=True)
    runs = {mode: True, "local": False} if world > 1 else {mode: True}
    for name, gather in runs.items():
        state = graftkit.get_eva_state_dict(base, batches, peft_config=config, gather_distributed_inputs=gather)
        path = os.path.join(out_dir, f"eva-{name}-{rank}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
