"""Preference losses and the preference objective: a chosen and a rejected answer per prompt.

A document's log-probability is the sum over its answer tokens of log p(token | everything before it); a
pair's chosen (c) and rejected (r) sums, and their averages per answer token, feed the losses (beta: --beta,
eps: --label_smoothing, gamma: --simpo_gamma, lambda: --orpo_lambda):

  dpo    -(1 - eps) log s(beta z) - eps log s(-beta z),   z = (c - ref_c) - (r - ref_r)    (Rafailov et al. 2023)
  ipo    (z' - 1 / (2 beta))^2, z' the same with per-token averages                          (Azar et al. 2023)
  hinge  max(0, 1 - beta z)                                                                  (SLiC, Zhao et al. 2023)
  simpo  -(1 - eps) log s(beta (avg_c - avg_r) - gamma) - eps log s(-(...)), no reference     (Meng et al. 2024)
  orpo   -avg_c - lambda log s(log odds(avg_c) - log odds(avg_r)), no reference               (Hong et al. 2024)

with s the sigmoid and log odds(p) = p - log(1 - e^p). `--preference_sft_weight` adds that weight times the
chosen answer's mean token loss. Every per-pair value is summed and divided by the step's pairs over all
micro-batches and processes, as token losses are divided by the step's label tokens. Logged as
rewards/chosen = beta (c - ref_c) (beta avg_c without a reference), rewards/rejected, rewards/margin,
rewards/accuracy (chosen's reward strictly higher), logps/chosen, logps/rejected (sums).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model import sequence_parallel

LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo", "hinge")


@dataclass(frozen=True)
class PreferenceSettings:
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    sft_weight: float = 0.0

    @property
    def uses_reference(self) -> bool:
        return self.loss in NEEDS_REFERENCE


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(s: PreferenceSettings, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                ref_rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) of each pair from summed log-probabilities (fp32 or fp64)."""
    avg_c, avg_r = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    eps = s.label_smoothing
    if s.uses_reference:
        ratio_c, ratio_r = chosen - ref_chosen, rejected - ref_rejected
        z = ratio_c - ratio_r
        if s.loss == "dpo":
            loss = -(1 - eps) * F.logsigmoid(s.beta * z) - eps * F.logsigmoid(-s.beta * z)
        elif s.loss == "ipo":
            per_token = ratio_c / chosen_tokens.clamp(min=1) - ratio_r / rejected_tokens.clamp(min=1)
            loss = (per_token - 1 / (2 * s.beta)) ** 2
        else:
            loss = torch.relu(1 - s.beta * z)
        rewards = s.beta * ratio_c, s.beta * ratio_r
    elif s.loss == "simpo":
        margin = s.beta * (avg_c - avg_r) - s.simpo_gamma
        loss = -(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)
        rewards = s.beta * avg_c, s.beta * avg_r
    else:  # orpo: the chosen answer's token loss plus the odds-ratio term
        log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
        loss = -avg_c - s.orpo_lambda * F.logsigmoid(log_odds)
        rewards = s.beta * avg_c, s.beta * avg_r
    if s.sft_weight:
        loss = loss - s.sft_weight * avg_c
    return loss, rewards[0], rewards[1]


def _answer_logps(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position of a chunk of hidden states (0 where the target is ignored)."""
    logits = head(hidden).float()
    valid = targets != -100
    picked = logits.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * valid


def token_logps(model, inputs: dict, chunk_tokens: int = 4096, **forward_options) -> tuple[torch.Tensor, object]:
    """([rows, width] log-probability of each labelled token given the ones before it, 0 elsewhere; the model's
    output), from the last hidden states through the output layer in chunks of tokens whose logits are recomputed
    in backward, so the whole [tokens x vocabulary] logits never exist at once. Column t holds token t's; for a
    sequence-parallel part (inputs with `shift_labels`), token t + 1's, the one position t predicts."""
    shifted = inputs.get("shift_labels")
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    out = model(**forward, use_cache=False, output_hidden_states=True, logits_to_keep=1, **forward_options)
    hidden = out.hidden_states[-1] if shifted is not None else out.hidden_states[-1][:, :-1]  # t predicts t + 1
    targets = shifted if shifted is not None else inputs["labels"][:, 1:]
    head = _unwrapped(model).get_output_embeddings()
    rows, width = targets.shape
    flat_hidden, flat_targets = hidden.reshape(rows * width, -1), targets.reshape(-1)
    parts = [checkpoint(_answer_logps, flat_hidden[i:i + chunk_tokens], head, flat_targets[i:i + chunk_tokens],
                        use_reentrant=False) for i in range(0, rows * width, chunk_tokens)]
    logps = torch.cat(parts).reshape(rows, width)
    if shifted is not None:
        return logps, out
    return F.pad(logps, (1, 0)), out  # aligned with the labels: column t is log p(token t)


def _unwrapped(model):
    """The module whose output layer to use: through DDP/DeepSpeed wrappers (their `module`) and peft."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    return model


def document_sums(model, batch, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, answer tokens) of each of a batch's documents under `model`; under sequence
    parallelism summed over the group (every process gets the whole documents' values, gradients stay local)."""
    logps, _ = token_logps(model, batch.tensors)
    part = "shift_labels" in batch.tensors
    sequence = batch.extra["shift_sequence" if part else "sequence"]
    labels = batch.tensors["shift_labels" if part else "labels"]
    sums, tokens = sequence_sums(logps, sequence, labels, n_sequences)
    return sequence_parallel.sum_over_group(sums), sequence_parallel.sum_over_group(tokens)


def sequence_sums(logps: torch.Tensor, sequence: torch.Tensor, labels: torch.Tensor, n_sequences: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, answer tokens) of each document, from the per-token values and document numbers."""
    counted = (labels != -100) & (sequence >= 0)
    index = torch.where(counted, sequence, 0).reshape(-1)
    sums = torch.zeros(n_sequences, device=logps.device, dtype=torch.float32)
    sums = sums.index_add(0, index, (logps * counted).reshape(-1).float())
    tokens = torch.zeros(n_sequences, device=logps.device, dtype=torch.float32)
    tokens = tokens.index_add(0, index, counted.reshape(-1).float())
    return sums, tokens


class PreferenceLoss:
    """The preference objective of a micro-batch of pairs (lowmem/data/pairs.py batches): one forward pass of the
    trained model over both answers, the reference's sums (lowmem/train/reference.py), the pair losses above."""

    perplexity = False  # evaluation reports the preference loss, accuracy and margin, not a perplexity
    routes = False

    def __init__(self, settings: PreferenceSettings, reference):
        self.settings, self.reference = settings, reference

    def describe(self) -> str:
        s = self.settings
        extra = {"simpo": f", gamma {s.simpo_gamma:g}", "orpo": f", lambda {s.orpo_lambda:g}"}.get(s.loss, "")
        smoothing = f", label smoothing {s.label_smoothing:g}" if s.label_smoothing else ""
        sft = f", + {s.sft_weight:g} x SFT on the chosen answer" if s.sft_weight else ""
        return f"preference loss {s.loss} (beta {s.beta:g}{extra}{smoothing}{sft}) | {self.reference.describe()}"

    def pair_values(self, model, batch) -> dict[str, torch.Tensor]:
        """Per-pair loss, rewards and log-probabilities of the batch."""
        n = batch.loss_units
        sums, tokens = document_sums(model, batch, 2 * n)
        reference = self.reference.sums(model, batch) if self.settings.uses_reference else None
        loss, reward_c, reward_r = pair_losses(self.settings, sums[:n], sums[n:], tokens[:n], tokens[n:],
                                               None if reference is None else reference[:, 0],
                                               None if reference is None else reference[:, 1])
        return {"loss": loss, "rewards/chosen": reward_c, "rewards/rejected": reward_r,
                "rewards/margin": reward_c - reward_r, "rewards/accuracy": (reward_c > reward_r).float(),
                "logps/chosen": sums[:n], "logps/rejected": sums[n:]}

    def __call__(self, model, batch, scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(what backward takes: the pair losses summed and divided by `scale`, detached parts to log likewise)."""
        values = self.pair_values(model, batch)
        loss = values["loss"].sum() / scale
        shared = sequence_parallel.size()  # a sequence group's processes hold the same pairs: logged once
        parts = {name: value.detach().sum() / scale / shared for name, value in values.items()}
        return loss, parts

    @torch.no_grad()
    def eval_sums(self, model, batch) -> dict[str, tuple[torch.Tensor, float]]:
        values = self.pair_values(model, batch)
        shared = sequence_parallel.size()
        return {name: (value.sum() / shared, batch.loss_units / shared) for name, value in values.items()}
