"""MALT's training loss: multi-label cross-entropy on soft targets, plus auxiliary terms.

As in LSTR ('MCE') and the MALT authors' code: per step, -sum_c target_c * log_softmax(logits)_c,
averaged over the steps that are not ambiguous; a frame with several actions has a 1 in each
of their columns (`model.multi_label_targets: lstr`) or 1/k (`normalised`). The auxiliary loss applies the same criterion
to each encoder output f_n (token i supervised by short-memory step i's label) and is added
with weight `aux_weight`: total = L_dec + aux_weight * sum_n L_aux(f_n).

The mean is taken over `num_valid` steps, which the training engine sets to the valid steps
of the whole global batch (summed over DDP processes) so that several processes produce the
same update as one process with the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossTerms", "loss_targets", "malt_loss", "soft_cross_entropy_sum"]


@dataclass
class LossTerms:
    total: torch.Tensor      # what is back-propagated
    decoder: torch.Tensor    # L_dec (detached, for logging)
    aux: torch.Tensor        # sum of the auxiliary terms (detached; 0 when off)


def soft_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid steps of -sum_c targets * log_softmax(logits).

    logits, targets (B, S, C+1); valid (B, S) bool.
    """
    per_step = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)   # (B, S)
    return (per_step * valid).sum()


def loss_targets(targets: torch.Tensor, multi_label: str = "lstr") -> torch.Tensor:
    """The rows the loss is computed against, from the stored targets (rows summing to 1).

    'lstr': multi-hot, as LSTR's target files: a frame with k actions counts -log p once per
    action (k times the weight of a one-action frame). 'normalised': the stored rows, 1/k on
    each action. Rows with one class are the same either way.
    """
    if multi_label == "lstr":
        return (targets > 0).to(targets.dtype)
    if multi_label == "normalised":
        return targets
    raise ValueError(f"multi_label must be 'lstr' or 'normalised', got {multi_label!r}")


def malt_loss(logits: torch.Tensor, aux_logits: list[torch.Tensor], targets: torch.Tensor,
              valid: torch.Tensor, aux_weight: float, use_aux: bool,
              num_valid: torch.Tensor | float | None = None,
              multi_label: str = "normalised") -> LossTerms:
    """Decoder loss + auxiliary losses of the encoder outputs.

    logits (B, S, C+1); aux_logits: list of (B, Q, C+1); targets (B, S, C+1) as stored (rows
    summing to 1), turned into the loss's rows by `loss_targets(targets, multi_label)`;
    valid (B, S). Encoder token i is supervised by short step i, for i < min(Q, S).
    `num_valid` defaults to the valid steps of this batch. Logits with one column more than
    the targets end with the authors' ambiguous output (`model.classifier_includes_ambiguous`):
    it gets no loss, as LSTR's MCE drops the ignore_index column before its log-softmax
    (criterions.py:52-54 at f910dd9).
    """
    num_columns = targets.shape[-1]
    if logits.shape[-1] not in (num_columns, num_columns + 1):
        raise ValueError(f"logits have {logits.shape[-1]} columns for {num_columns} target columns")
    logits, aux_logits = logits[..., :num_columns], [a[..., :num_columns] for a in aux_logits]
    targets = loss_targets(targets, multi_label)
    if num_valid is None:
        num_valid = valid.sum()
    denominator = torch.as_tensor(num_valid, dtype=torch.float32, device=logits.device).clamp(min=1)
    decoder = soft_cross_entropy_sum(logits, targets, valid) / denominator
    aux = torch.zeros((), device=logits.device)
    if use_aux:
        for encoder_logits in aux_logits:
            steps = min(encoder_logits.shape[1], targets.shape[1])
            # Fewer tokens than steps cover a fraction of the steps: scale the denominator alike.
            covered = denominator * steps / targets.shape[1]
            aux = aux + soft_cross_entropy_sum(encoder_logits[:, :steps], targets[:, :steps],
                                               valid[:, :steps]) / covered
    total = decoder + aux_weight * aux if use_aux else decoder
    return LossTerms(total=total, decoder=decoder.detach(), aux=aux.detach())
