"""Which attention kernel a decoder trains with: `--attn_implementation`, or a choice made for the run.

auto: flash-attn 2 when it is importable on CUDA (and not --disable_flash_attn); else, for packed rows on
CUDA (without sequence parallelism), FlexAttention with a document mask (only the blocks inside each sample are
computed); else, for packed rows, `sdpa_varlen`: PyTorch SDPA run on each document of a row, causal inside it; else PyTorch SDPA. Plain
`sdpa` on packed rows gets a dense [tokens x tokens] block-diagonal mask from transformers (64 MiB at 8k
tokens, 1 GiB at 32k), which also keeps its kernel from skipping the masked blocks: 4 documents of 2048 took
longer than one of 8192. An explicit choice that cannot run here is a UserError, not a crash in the first step.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ..run.errors import UserError

CHOICES = ("auto", "sdpa", "sdpa_varlen", "flex_attention", "flash_attention_2", "eager")
VARLEN = "sdpa_varlen"


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
    if choice == VARLEN:
        return _varlen_name(cfg)
    return choice


def _varlen_name(cfg) -> str:
    """The name transformers knows sdpa_varlen by: its own, or `sdpa` itself under sequence parallelism (accelerate
    accepts only sdpa and flash-attn there; DeepSpeed then wraps whatever that name runs, here the per-document SDPA,
    which is plain SDPA on anything but packed training rows)."""
    if getattr(cfg, "sequence_parallel_size", 1) > 1:
        register_varlen("sdpa")
        return "sdpa"
    register_varlen()
    return VARLEN


def is_varlen(name: str) -> bool:
    """Whether `name` runs SDPA per packed document in this process."""
    return name == VARLEN or name in _VARLEN_NAMES


def _automatic(cfg, cuda: bool) -> str:
    if cuda and not cfg.disable_flash_attn and flash_attn_importable():
        return "flash_attention_2"
    # FlexAttention has no dropout; under sequence parallelism DeepSpeed rebuilds its mask as one causal block
    sequence_parallel = getattr(cfg, "sequence_parallel_size", 1) > 1
    if cuda and cfg.packing and not cfg.dropout and not sequence_parallel and flex_attention_problem("cuda") is None:
        return "flex_attention"
    if cfg.packing:
        return _varlen_name(cfg)
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


# ------------------------------------------------------------------ SDPA per packed document
def _document_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """[start, end) of each document of each row, where positions restart; None when every row is one document."""
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if int(restart.sum()) == position_ids.shape[0]:
        return None
    width = position_ids.shape[1]
    bounds = []
    for row in restart:
        starts = torch.nonzero(row).flatten().tolist()
        bounds.append(list(zip(starts, starts[1:] + [width])))
    return bounds


_BOUNDS: list = [None, None]  # (position_ids, bounds) of the last call: every layer of a forward shares them


def _bounds_of(position_ids: torch.Tensor):
    if _BOUNDS[0] is not position_ids:
        _BOUNDS[:] = [position_ids, _document_bounds(position_ids)]
    return _BOUNDS[1]


def sdpa_varlen_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' SDPA attention, run on each packed document of a row (causal inside it) instead of once with a
    [tokens x tokens] mask. Anything else (padding masks, a KV cache, one document per row) is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    whole = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]
    bounds = _bounds_of(position_ids.expand(query.shape[0], -1)) if whole else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for b, documents in enumerate(bounds):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        None, **{**kwargs, "is_causal": True})[0] for s, e in documents]
        rows.append(torch.cat(parts, dim=1))  # [1, tokens, heads, head_dim]
    return torch.cat(rows, dim=0), None


def _varlen_mask(*args, attention_mask=None, q_length: int = 0, kv_length: int = 0, q_offset: int = 0,
                 kv_offset: int = 0, **kwargs):
    """No mask where sdpa_varlen splits the rows itself (training rows without padding); SDPA's mask elsewhere."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


_VARLEN_NAMES: set[str] = set()


@functools.lru_cache(maxsize=None)
def register_varlen(name: str = VARLEN) -> None:
    """Make `name` run sdpa_varlen in transformers (its attention and its mask), once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, sdpa_varlen_forward)
    AttentionMaskInterface.register(name, _varlen_mask)
    _VARLEN_NAMES.add(name)
