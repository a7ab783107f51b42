"""Which attention kernel a decoder trains with: `--attn_implementation`, or a choice made for the run.

auto: flash-attn 2 when it is importable on CUDA (and not --disable_flash_attn); else, for packed rows on
CUDA, FlexAttention with a document mask (only the blocks inside each sample are computed); else PyTorch
SDPA, to which transformers hands a dense block-diagonal mask built from the restarting position ids of
packed rows. An explicit choice that cannot run here is a UserError, not a crash in the first step.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ..run.errors import UserError

CHOICES = ("auto", "sdpa", "flex_attention", "flash_attention_2", "eager")


def attention_backend(cfg) -> str:
    """The attn_implementation passed to transformers for this run's decoder."""
    choice = cfg.attn_implementation
    if choice not in CHOICES:
        raise UserError(f"attn_implementation '{choice}' is unknown; choose one of {', '.join(CHOICES)}")
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return _automatic(cfg, cuda)
    if choice == "flash_attention_2":
        _check_flash_attn(cfg, cuda)
    if choice == "flex_attention":
        _check_flex(cfg, "cuda" if cuda else "cpu")
    return choice


def _automatic(cfg, cuda: bool) -> str:
    if cuda and not cfg.disable_flash_attn and flash_attn_importable():
        return "flash_attention_2"
    # FlexAttention has no dropout; with dropout the dense-mask SDPA path keeps the run going
    if cuda and cfg.packing and not cfg.dropout and flex_attention_problem("cuda") is None:
        return "flex_attention"
    return "sdpa"


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _check_flash_attn(cfg, cuda: bool) -> None:
    if cfg.disable_flash_attn:
        raise UserError("--attn_implementation=flash_attention_2 contradicts --disable_flash_attn=True; drop one")
    if not cuda or not flash_attn_importable():
        raise UserError("--attn_implementation=flash_attention_2 needs a CUDA GPU and `pip install flash-attn`; "
                        "use --attn_implementation=sdpa (or flex_attention on CUDA) instead")


def _check_flex(cfg, device: str) -> None:
    if cfg.dropout:
        raise UserError(f"--attn_implementation=flex_attention has no attention dropout (--dropout={cfg.dropout}); "
                        "set --dropout=0 or use --attn_implementation=sdpa")
    problem = flex_attention_problem(device)
    if problem:
        raise UserError(f"--attn_implementation=flex_attention cannot train here: {problem}; "
                        "use --attn_implementation=sdpa")


@functools.lru_cache(maxsize=None)
def flex_attention_problem(device: str) -> str | None:
    """Why FlexAttention cannot train on `device` with this torch, or None when a tiny forward+backward runs."""
    from transformers.utils import is_torch_flex_attn_available

    if not is_torch_flex_attn_available():
        return f"torch {torch.__version__} has no FlexAttention (needs 2.5 or newer)"
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        return "FlexAttention on CUDA compiles Triton kernels and triton is not installed"
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow; this probe is tiny
            flex_attention(q, q, q).sum().backward()
    except (NotImplementedError, RuntimeError) as exc:
        return f"{str(exc).splitlines()[0].split('. ')[0].rstrip('.')} (torch {torch.__version__})"
    return None
