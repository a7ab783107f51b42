"""Attention for packed rows: which backend a run gets, and that packed samples stay apart in each of them."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import COMPILES, cli_here, flags, tiny_config

from config import TrainConfig
from lowmem.data.batches import collate_packed
from lowmem.model import attention
from lowmem.model.attention import attention_backend, flex_attention_problem
from lowmem.run.errors import UserError

VOCAB = 64
LENGTHS = [[11, 17, 9], [30, 6]]  # two packed rows: three samples, then two (the second row has a padding tail)


@dataclasses.dataclass
class Sample:
    """An encoded sample as collate_packed reads it (attribute or key access)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __getitem__(self, key):
        return getattr(self, key)


def _rows(seed: int = 0, changed: tuple[int, int] | None = None) -> list[list[Sample]]:
    """Packed rows of random samples; `changed` = (row, sample) gets other tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r, lengths in enumerate(LENGTHS):
        row = []
        for s, n in enumerate(lengths):
            ids = torch.randint(4, VOCAB, (n,), generator=gen)
            if changed == (r, s):
                ids = (ids + 7) % (VOCAB - 4) + 4
            row.append(Sample(ids, ids.clone()))
        rows.append(row)
    return rows


def _batch(changed=None) -> dict:
    return collate_packed(_rows(changed=changed), pad_id=0, position=0, skip=0).tensors


def _spans(row: int) -> list[slice]:
    starts = [sum(LENGTHS[row][:i]) for i in range(len(LENGTHS[row]))]
    return [slice(a, a + n) for a, n in zip(starts, LENGTHS[row])]


def _model(attn: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    attention.register_varlen()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).to(device)


@torch.no_grad()
def _logits(attn: str, batches: list[dict]) -> list[torch.Tensor]:
    model = _model(attn).eval()  # eval: FlexAttention runs forward only on CPU
    return [model(**b, use_cache=False).logits for b in batches]


def _forward_backends() -> list[str]:
    from transformers.utils import is_torch_flex_attn_available

    return ["sdpa", "sdpa_varlen", "eager"] + (["flex_attention"] if is_torch_flex_attn_available() else [])


CPU_FORWARD_BACKENDS = _forward_backends()


@pytest.fixture(scope="module")
def forward_logits():
    """Logits of each backend for the base batch and for batches with one sample changed (one compile for flex)."""
    changes = [None, (0, 0), (0, 1), (1, 0)]
    batches = [_batch(c) for c in changes]
    return {attn: dict(zip(changes, _logits(attn, batches))) for attn in CPU_FORWARD_BACKENDS}


@pytest.mark.slow
@COMPILES
@pytest.mark.parametrize("attn", CPU_FORWARD_BACKENDS)
def test_packed_samples_do_not_attend_to_each_other(forward_logits, attn):
    logits = forward_logits[attn]
    base = logits[None]
    for (row, sample), after in ((k, v) for k, v in logits.items() if k is not None):
        for index, span in enumerate(_spans(row)):
            if index == sample:
                assert not torch.allclose(after[row, span], base[row, span]), "the changed sample itself must change"
            else:  # every other sample of the row, before and after the changed one, is untouched
                torch.testing.assert_close(after[row, span], base[row, span], rtol=0, atol=1e-5)
        other = 1 - row
        torch.testing.assert_close(after[other], base[other], rtol=0, atol=1e-5)


@pytest.mark.slow
@COMPILES
def test_flex_attention_forward_matches_sdpa(forward_logits):
    if "flex_attention" not in forward_logits:
        pytest.skip(f"torch {torch.__version__} has no FlexAttention")
    flex, sdpa = forward_logits["flex_attention"][None], forward_logits["sdpa"][None]
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)


def _loss_and_grads(attn: str, device: str):
    model = _model(attn, device).train()
    inputs = {k: v.to(device) for k, v in _batch().items()}
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]).cpu()


def _device_unusable(device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    problem = flex_attention_problem(device)
    return f"FlexAttention cannot train on {device}: {problem}" if problem else None


def test_sdpa_per_document_matches_the_dense_mask_without_building_it(monkeypatch):
    """sdpa_varlen equals SDPA with transformers' block-diagonal mask (loss and every gradient) on packed rows, never
    asks for a [tokens x tokens] mask there, and is plain SDPA on padded rows."""
    from transformers import masking_utils

    loss_dense, grads_dense = _loss_and_grads("sdpa", "cpu")
    built = []
    original = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: built.append(1) or original(*a, **k))
    loss_varlen, grads_varlen = _loss_and_grads("sdpa_varlen", "cpu")
    assert not built
    assert loss_varlen == pytest.approx(loss_dense, rel=1e-5)
    torch.testing.assert_close(grads_varlen, grads_dense, rtol=0, atol=1e-5 * grads_dense.abs().max().item())
    padded = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    with torch.no_grad():
        same = [_model(attn).eval()(**padded, use_cache=False).logits for attn in ("sdpa", "sdpa_varlen")]
    torch.testing.assert_close(same[0][0], same[1][0])
    torch.testing.assert_close(same[0][1, :2], same[1][1, :2])


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu", "gpu"])
def test_flex_attention_matches_sdpa_loss_and_gradients(device):
    reason = _device_unusable(device)
    if reason:
        pytest.skip(reason)
    loss_sdpa, grads_sdpa = _loss_and_grads("sdpa", device)
    loss_flex, grads_flex = _loss_and_grads("flex_attention", device)
    assert loss_flex == pytest.approx(loss_sdpa, rel=1e-4)
    torch.testing.assert_close(grads_flex, grads_sdpa, rtol=0, atol=1e-3 * grads_sdpa.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_picks_flex_attention_for_packed_rows(tokenizer_dir):
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model

    cfg = TrainConfig(model_preset="tiny", packing=True, tokenizer_dir=tokenizer_dir)
    expected = ("flash_attention_2" if attention.flash_attn_importable() else
                "flex_attention" if flex_attention_problem("cuda") is None else "sdpa")
    assert attention_backend(cfg) == expected
    assert build_model(cfg, load_tokenizer(tokenizer_dir)).config._attn_implementation == expected
    assert attention_backend(dataclasses.replace(cfg, packing=False)) in ("sdpa", "flash_attention_2")


def _cfg(**values) -> TrainConfig:
    return TrainConfig(**values)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_cpu_choices():
    assert attention_backend(_cfg()) == "sdpa"
    assert attention_backend(_cfg(packing=True)) == "sdpa_varlen"  # FlexAttention has no CPU backward to train with
    assert attention_backend(_cfg(attn_implementation="eager", packing=True)) == "eager"
    assert attention_backend(_cfg(attn_implementation="sdpa")) == "sdpa"
    with pytest.raises(UserError, match="flash-attn"):
        attention_backend(_cfg(attn_implementation="flash_attention_2"))
    if flex_attention_problem("cpu"):
        with pytest.raises(UserError, match="cannot train here"):
            attention_backend(_cfg(attn_implementation="flex_attention", packing=True))
    else:
        assert attention_backend(_cfg(attn_implementation="flex_attention")) == "flex_attention"


def test_contradictions_are_refused():
    with pytest.raises(UserError, match="contradicts --disable_flash_attn"):
        attention_backend(_cfg(attn_implementation="flash_attention_2", disable_flash_attn=True))
    with pytest.raises(UserError, match="no attention dropout"):
        attention_backend(_cfg(attn_implementation="flex_attention", dropout=0.1))
    with pytest.raises(UserError, match="is unknown"):
        attention_backend(dataclasses.replace(_cfg(), attn_implementation="flash"))


def test_auto_decision_on_cuda(monkeypatch):
    """The auto rule, with what the machine offers set by hand (this decides; the GPU test above runs it)."""
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    offers = {"flash": False, "flex": True}
    monkeypatch.setattr(attention, "flash_attn_importable", lambda: offers["flash"])
    monkeypatch.setattr(attention, "flex_attention_problem", lambda device: None if offers["flex"] else "no flex")
    assert attention_backend(_cfg(packing=True)) == "flex_attention"
    assert attention_backend(_cfg(packing=False)) == "sdpa"
    assert attention_backend(_cfg(packing=True, dropout=0.1)) == "sdpa_varlen"  # flex has no dropout
    offers["flex"] = False
    assert attention_backend(_cfg(packing=True)) == "sdpa_varlen"
    offers["flash"] = True
    assert attention_backend(_cfg(packing=True)) == "flash_attention_2"
    assert attention_backend(_cfg(packing=True, disable_flash_attn=True)) == "sdpa_varlen"
    offers["flex"] = True
    assert attention_backend(_cfg(packing=True, disable_flash_attn=True)) == "flex_attention"
    assert attention_backend(_cfg(attn_implementation="flash_attention_2")) == "flash_attention_2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA with flash-attn installed the run would start")
def test_cli_refuses_flash_attention_without_flash_attn_in_one_line(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, max_steps=2, warmup_steps=0,
                      attn_implementation="flash_attention_2")
    result = cli_here(["train", *flags(cfg)])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "flash_attention_2" in line]
    assert len(message) == 1 and "flash-attn" in message[0], result.stderr[-2000:]
