"""Run by tests/test_sequence_parallel.py under `accelerate launch` with 2 CPU processes: the trainer's own pieces
(the batch cut, Ulysses with the trainer's attention, the objectives) on each process's part of every sequence,
against the same objective on whole sequences in one process.

For each case (a dense Llama on packed rows against the same documents unpacked, LoRA, a tiny Qwen3-MoE with its
router loss, a DPO pair batch with cached reference sums), both processes first compute the loss and every gradient
on the whole batch alone, then those of their parts: the parts' gradients added up over the group (what DeepSpeed
does) must equal the whole batch's, and so must the logged values (loss, router loss, rewards, ...). Prints one
`CASE <name> ok [logged names]` line per case.
"""
from __future__ import annotations

import os
import sys

import torch

REPO, MOE_DIR, TOKENIZER = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, REPO)


def setup():
    from accelerate.state import PartialState

    state = PartialState(cpu=True)  # without it CPU processes under this launcher all believe they are rank 0
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    deepspeed.init_distributed(dist_backend="gloo")
    return state, UlyssesSPAttentionHF


def llama(lora: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from config import TrainConfig
    from lowmem.model.build import apply_training_options

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256), attn_implementation="sdpa")
    cfg = TrainConfig(lora_r=8 if lora else 0, lora_dropout=0.0, chunked_cross_entropy=True)
    model = apply_training_options(model, cfg, log=lambda _: None)
    if lora:  # B starts at zero: give every adapter weight a value, so every gradient is tested
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return model


def moe():
    from transformers import AutoModelForCausalLM

    from config import TrainConfig
    from lowmem.model.build import apply_training_options

    model = AutoModelForCausalLM.from_pretrained(MOE_DIR, attn_implementation="sdpa")
    return apply_training_options(model, TrainConfig(), log=lambda _: None)


def token_batches(vocab: int, pad: int = 0):
    """(packed batch, the same documents unpacked) of three documents in two rows."""
    from lowmem.data.batches import collate, collate_packed
    from lowmem.data.encoding import Encoded

    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, vocab, (n,), generator=gen) for n in (21, 14, 30)]
    labelled = []
    for ids in docs:
        labels = ids.clone()
        labels[:3] = -100  # a prompt part: not trained
        labelled.append(Encoded(ids, labels))
    return collate_packed([[labelled[0], labelled[1]], [labelled[2]]], pad, 0, 0), collate(labelled, pad, False, 0)


def pair_batch(vocab: int):
    from lowmem.data.pairs import EncodedPair, collate_packed_pairs

    gen = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(4, vocab, (n,), generator=gen).tolist()  # noqa: E731
    pairs = [EncodedPair(ids(9), ids(7), ids(12)), EncodedPair(ids(5), ids(11), ids(6))]
    rows = [[(pairs[0], 0), (pairs[1], 1)], [(pairs[0], 1), (pairs[1], 0)]]
    batch = collate_packed_pairs(rows, 0, 0, 0)
    batch.extra["reference"] = torch.tensor([[-40.0, -45.0], [-50.0, -48.0]], dtype=torch.float64)
    return batch


def loss_and_grads(model, objective, batch, scale):
    """(the parts the loop logs, every gradient) of one forward and backward."""
    model.zero_grad()
    loss, logged = objective(model, batch, torch.tensor(float(scale)))
    loss.backward()
    return logged, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(name, whole, parts, group):
    logged, grads = parts
    for key, value in logged.items():  # what the loop logs adds up over the processes to the whole batch's
        total = value.clone()
        torch.distributed.all_reduce(total, group=group)
        assert torch.allclose(total, whole[0][key], rtol=1e-5, atol=1e-6), (name, key, total.item(),
                                                                             whole[0][key].item())
    assert grads.keys() == whole[1].keys() and grads, name
    for key, grad in grads.items():
        summed = grad.clone()
        torch.distributed.all_reduce(summed, group=group)  # DeepSpeed adds a sequence group's gradients up
        reference = whole[1][key]
        assert torch.allclose(summed, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item() + 1e-8), \
            (name, key, (summed - reference).abs().max().item())
    print(f"CASE {name} ok {sorted(logged)}", flush=True)


def main():
    state, ulysses = setup()
    from lowmem.data.shards import cut
    from lowmem.model import attention, sequence_parallel
    from lowmem.train.objective import TokenLoss
    from lowmem.train.preference import PreferenceLoss, PreferenceSettings
    from lowmem.train.reference import Reference

    attention.register_varlen("sdpa")  # sdpa_varlen under the name accelerate accepts, as the trainer does
    sequence_parallel.keep_core_attention("sdpa")
    rank = state.process_index
    models = {"dense": llama(), "lora": llama(lora=True), "moe": moe()}
    first = models["dense"]
    group_state = ulysses.register_with_transformers(first, "sdpa", 2, micro_batch_size=2)
    group = group_state.get_sequence_parallel_group()
    assert sequence_parallel.size() == 2

    for name, model in models.items():
        model.train()
        objective = TokenLoss(model, False, None if name == "moe" else 0.0)
        packed, unpacked = token_batches(model.config.vocab_size)
        with sequence_parallel.whole_sequences():
            whole = loss_and_grads(model, objective, unpacked if name == "dense" else packed, packed.loss_units)
        mine = cut(packed, rank, 2, 0)
        compare(name, whole, loss_and_grads(model, objective, mine, packed.loss_units), group)

    model = models["lora"]
    objective = PreferenceLoss(PreferenceSettings("dpo", beta=0.5), Reference("cache", None))
    pairs = pair_batch(model.config.vocab_size)
    with sequence_parallel.whole_sequences():
        whole = loss_and_grads(model, objective, pairs, pairs.loss_units)
    compare("dpo", whole, loss_and_grads(model, objective, cut(pairs, rank, 2, 0), pairs.loss_units), group)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
