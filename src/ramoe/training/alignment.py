"""The RA-MoE routing alignment loss (Deng et al., arXiv 2605.28306) and its two alternative forms.

Per alignment-zone layer l with task experts T_l, for the English teacher distribution q_en and
the target-language student distribution q_tgt (each the mean routing distribution of one
sequence, over experts):

    m = sum of q(e) over e in T_l              mass on the task experts
    r(e) = q(e) / m for e in T_l               how that mass is split among them
    L_l = KL_Bernoulli(m_en || m_tgt) + beta * KL(r_en || r_tgt)

and the alignment loss of a sequence is the mean of L_l over the zone layers that have task
experts. The alternatives, behind the same config key ``finetune.alignment.loss``:

* ``js``: Jensen-Shannon divergence between q_en and q_tgt over all experts (SARA's form);
* ``kl``: KL(q_en || q_tgt) over all experts (Bandarkar et al.'s later contrastive code).

Both average over every zone layer, with or without task experts. All logarithms are natural,
so the losses are in nats. Inputs are float32; probabilities are clamped at ``eps`` before a
logarithm so that an expert with zero mass gives a finite loss and gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

LOSSES = ("mass_split", "js", "kl")


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) elementwise, in nats; p and q are clamped to [eps, 1 - eps]."""
    p = p.clamp(eps, 1.0 - eps)
    q = q.clamp(eps, 1.0 - eps)
    return p * (p.log() - q.log()) + (1.0 - p) * ((1.0 - p).log() - (1.0 - q).log())


def categorical_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(p || q) over the last dimension, in nats. Terms with p = 0 contribute 0."""
    log_ratio = p.clamp_min(eps).log() - q.clamp_min(eps).log()
    return (p * log_ratio).sum(dim=-1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """JSD(p, q) = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, over the last dimension, in nats."""
    m = 0.5 * (p + q)
    return 0.5 * (categorical_kl(p, m, eps) + categorical_kl(q, m, eps))


def layer_alignment_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    experts: Sequence[int],
    *,
    loss: str = "mass_split",
    beta: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Alignment loss of one layer per sequence: (N,) from (N, E) student and teacher distributions.

    ``experts`` are the layer's task experts; ``mass_split`` needs at least one, the all-expert
    forms ignore them. The teacher is treated as a constant target (no gradient flows into it).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student routing {tuple(student.shape)} and teacher routing {tuple(teacher.shape)} differ.")
    teacher = teacher.detach()
    if loss == "js":
        return jensen_shannon(teacher, student, eps)
    if loss == "kl":
        return categorical_kl(teacher, student, eps)
    if loss != "mass_split":
        raise ValueError(f"alignment loss {loss!r} is not one of {LOSSES}; set finetune.alignment.loss.")
    if len(experts) == 0:
        raise ValueError("the mass_split alignment loss needs at least one task expert in the layer.")
    index = torch.as_tensor(list(experts), dtype=torch.long, device=student.device)
    on_task_s = student.index_select(-1, index)  # (N, |T|)
    on_task_t = teacher.index_select(-1, index)
    mass_s = on_task_s.sum(dim=-1)  # (N,)
    mass_t = on_task_t.sum(dim=-1)
    mass_term = bernoulli_kl(mass_t, mass_s, eps)
    if len(experts) == 1:
        # One task expert: the split among task experts is always (1,), so its KL is 0.
        return mass_term
    split_s = on_task_s / mass_s.clamp_min(eps).unsqueeze(-1)
    split_t = on_task_t / mass_t.clamp_min(eps).unsqueeze(-1)
    return mass_term + beta * categorical_kl(split_t, split_s, eps)


def aligned_layers(zone: tuple[int, int], experts_by_layer: Mapping[int, Sequence[int]], moe_layers: Sequence[int],
                   loss: str) -> list[int]:
    """Select the layers the loss averages over: zone layers with task experts (``mass_split``) or every MoE zone layer."""
    first, last = zone
    in_zone = [layer for layer in moe_layers if first <= layer <= last]
    if loss == "mass_split":
        return [layer for layer in in_zone if experts_by_layer.get(layer)]
    return in_zone


def alignment_loss(
    student: Mapping[int, torch.Tensor],
    teacher: Mapping[int, torch.Tensor],
    experts_by_layer: Mapping[int, Sequence[int]],
    layers: Sequence[int],
    *,
    loss: str = "mass_split",
    beta: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over ``layers`` of the per-layer loss: (N,) per sequence, from {layer: (N, E)} distributions."""
    if not layers:
        raise ValueError("no alignment layers: the zone has no layer with task experts.")
    per_layer = [
        layer_alignment_loss(student[layer], teacher[layer], experts_by_layer.get(layer, ()), loss=loss, beta=beta,
                             eps=eps)
        for layer in layers
    ]
    return torch.stack(per_layer, dim=0).mean(dim=0)


def sequence_routing(probs: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """Mean routing distribution per sequence over the tokens of ``span_mask``: (B, E).

    ``probs`` is (B * T, E) in the batch-major row order in which routers flatten their input.
    ``span_mask`` is (B, T) and is True on the tokens that count, which are never padding.
    """
    batch, seq_len = span_mask.shape
    probs = probs.reshape(batch, seq_len, -1)
    weights = span_mask.to(probs.dtype).unsqueeze(-1)  # (B, T, 1)
    counts = weights.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return (probs * weights).sum(dim=1) / counts
