"""Building and shaping the model: what is built, which kernels and options it trains with, how big it is.

build.py         a preset (random init) or a local Hugging Face directory, with the training options applied
adapters.py      LoRA and QLoRA through peft, their checks and the merge math
moe.py           mixture-of-experts specifics (router loss, ZeRO-3 leaves)
attention.py     which attention kernel (sdpa_varlen: SDPA per packed document); recompute.py activation
                 checkpointing; offload.py its inputs in host memory; tiling.py MLPs in shards; chunked_loss.py
                 the loss without whole logits
sequence_parallel.py  one sequence over N processes (DeepSpeed Ulysses): checks, groups, sums over a group
sizes.py         parameter counts (total, active, trained), true under ZeRO-3

Model options (checkpointing, tiling, offload) must be numerically invisible: a test compares each with the
plain model. This package knows nothing of data files or the loop.
May import: run.
"""
