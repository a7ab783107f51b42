"""The trainer's memory plan for Qwen3-30B-A3B (48 layers, 128 experts, 8 active), built on the meta device (no
weights are allocated), full-parameter and with LoRA, under ZeRO-3 on 8 processes and on one.

    python bench/moe_memory_plan.py [--seq 2048] [--batch 1] [--world 8] [--sequence_parallel 1,2,4,8]

Prints the parameter counts (all, active per token, trained) and lowmem.train.memory_plan's line for each setting; the
numbers are estimates of the plan, not measurements. --sequence_parallel adds, for each size N, the plan of LoRA
r=16 and of full 8-bit training under ZeRO-3 on --world GPUs with each sequence split N ways (--seq tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


GPU = {"device": "cuda", "budget": (80 * 2**30, "an 80 GiB GPU")}  # planned for an H100 from any machine


def qwen3_30b_a3b():
    """Qwen3-30B-A3B's shape (its published config.json), as a model on the meta device."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False,
                            max_position_embeddings=40960)
    with torch.device("meta"):
        return Qwen3MoeForCausalLM(config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--sequence_parallel", default="", help="comma-separated sizes, e.g. 1,2,4,8")
    args = parser.parse_args(argv)
    import torch

    from config import TrainConfig
    from lowmem.model.adapters import apply_lora
    from lowmem.model.sizes import count_parameters, parameter_counts
    from lowmem.train.memory_plan import memory_plan

    base = TrainConfig(max_seq_len=args.seq, batch_size_per_gpu=args.batch, gradient_checkpointing=True,
                       chunked_cross_entropy=True)
    model = qwen3_30b_a3b()
    total, active = parameter_counts(model)
    print(f"Qwen3-30B-A3B: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
    print(f"full, adamw, ZeRO-3 on {args.world}: {memory_plan(model, base, 'bf16', args.world, 3)}")
    compact = dataclasses.replace(base, optimizer="adamw_8bit", bf16_weights=True)
    print(f"full, adamw_8bit + bf16 weights, ZeRO-3 on {args.world}: "
          f"{memory_plan(model.to(torch.bfloat16), compact, 'bf16', args.world, 3)}")
    lora = dataclasses.replace(base, lora_r=16, lora_dropout=0.0)
    peft_model = apply_lora(model.to(torch.bfloat16), lora, log=lambda line: print(f"  {line}"))  # a bf16 base
    print(f"LoRA r=16: {count_parameters(peft_model, trained_only=True) / 1e6:.1f}M trained")
    for world, stage in ((args.world, 3), (1, 0)):
        where = f"ZeRO-3 on {world}" if stage else "one GPU"
        print(f"LoRA r=16, {where}: {memory_plan(peft_model, lora, 'bf16', world, stage)}")
    for n in [int(x) for x in args.sequence_parallel.split(",") if x]:
        sp_lora = dataclasses.replace(lora, sequence_parallel_size=n, packing=True)
        print(f"LoRA r=16, ZeRO-3 on {args.world}, each sequence split over {n}: "
              f"{memory_plan(peft_model, sp_lora, 'bf16', args.world, 3, parts=n, **GPU)}")
    if args.sequence_parallel:
        full = qwen3_30b_a3b().to(torch.bfloat16)
        for n in [int(x) for x in args.sequence_parallel.split(",") if x]:
            sp_full = dataclasses.replace(compact, sequence_parallel_size=n, packing=True)
            print(f"full, adamw_8bit + bf16 weights, ZeRO-3 on {args.world}, each sequence split over {n}: "
                  f"{memory_plan(full, sp_full, 'bf16', args.world, 3, parts=n, **GPU)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
