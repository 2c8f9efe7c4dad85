"""The router auxiliary loss of one optimizer step of a mixture-of-experts policy: TRL's
``loss + coef * aux_loss``, where ``aux_loss`` is the load-balancing loss of all the step's tokens.

What "exact" means here. transformers' aux loss (``load_balancing_loss_func``: experts x sum over
experts of [share of the top-k assignments that went to the expert] x [mean router probability of
the expert], over all layers and the unpadded tokens) is a statistic of one batch, not a sum over
its sequences: the aux of 4 pairs is not the mean of the aux of 2 + 2. TRL adds it once per forward
and the HF Trainer averages its micro-batches, so a TRL step's aux is the mean of its micro-batches'
aux and changes with the accumulation split (and the number of ranks). Here a step's aux is the
model's own ``load_balancing_loss_func`` applied once to the router logits of every token of the
step (every micro-batch of every rank, padding masked out): what one forward of the whole step as
one batch gives. Its value and its gradient are the same for any micro-batch size, accumulation,
rank count and layout (padded or packed), up to floating-point summation order; with the whole
step in one micro-batch on one process it is exactly TRL's.

How. The gradient of the aux through one micro-batch's router logits depends on every other
micro-batch's (the expert loads and the token count are the step's), so before a step's first
backward all its router logits are collected: micro-batches 2..n are forwarded once more without
gradient (an extra forward each, only when accumulating), micro-batch 1's come from its training
forward, other ranks' are all-gathered. The aux is evaluated on those logits Z (detached), its
gradient G = d aux / dZ taken, and each micro-batch's backward adds coef * <z, G> for its own
logits z: by the chain rule exactly coef * d aux / d weights through that micro-batch. The
pre-pass must route as the training forward does: a deterministic forward (train.disable_dropout,
the default; no router jitter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dpo_engine.modeling.router import Router


class StepAux:
    """One step's router logits, their aux loss (``value``) and the surrogate each micro-batch adds to
    its loss before backward. ``grad_scale``: FSDP averages gradients over ranks, so there each
    rank's surrogate is multiplied by the rank count (1 for the summed replicated path)."""

    def __init__(self, router: Router, coef: float, n_micro: int, n_ranks: int = 1, grad_scale: float = 1.0):
        self.router, self.coef, self.n_ranks, self.grad_scale = router, coef, n_ranks, grad_scale
        self.slots: list[tuple[list[torch.Tensor], torch.Tensor] | None] = [None] * n_micro
        self.value: float | None = None
        self._grads: list[list[torch.Tensor]] | None = None

    def record(self, i: int, logits, attention_mask: torch.Tensor) -> None:
        """Micro-batch ``i``'s router logits (one [rows, experts] tensor per MoE layer, rows in the
        order of ``attention_mask.reshape(-1)``), kept detached in float32."""
        if not logits:
            raise ValueError("the model returned no router logits (no MoE layer ran)")
        self.slots[i] = ([z.detach().float() for z in logits], attention_mask.reshape(-1).detach().float())

    def surrogate(self, i: int, logits, attention_mask: torch.Tensor) -> torch.Tensor:
        """The term micro-batch ``i`` adds to its loss: its gradient is coef x the step aux's gradient
        through this micro-batch's router logits. The first call (every slot recorded, every rank
        here) evaluates the step's aux."""
        if self.slots[i] is None:
            self.record(i, logits, attention_mask)
        if self._grads is None:
            self._solve()
        return self.coef * self.grad_scale * sum((z.float() * g).sum() for z, g in zip(logits, self._grads[i]))

    def _solve(self) -> None:
        missing = [i for i, s in enumerate(self.slots) if s is None]
        if missing:
            raise RuntimeError(f"router logits of micro-batches {missing} were not recorded before the first backward")
        n_layers = len(self.slots[0][0])
        local = [torch.cat([s[0][layer] for s in self.slots]) for layer in range(n_layers)]
        mask = torch.cat([s[1] for s in self.slots])
        start = 0
        if self.n_ranks > 1:  # every rank's rows, in rank order; this rank's start at ``start``
            stacked = _gather_rows(torch.stack(local, dim=1), self.n_ranks)  # [rows, layers, experts] each
            masks = _gather_rows(mask, self.n_ranks)
            start = sum(m.numel() for m in masks[:dist.get_rank()])
            local = [torch.cat([s[:, layer] for s in stacked]) for layer in range(n_layers)]
            mask = torch.cat(masks)
        leaves = [z.clone().requires_grad_(True) for z in local]
        with torch.enable_grad():
            aux = self.router.loss_fn(tuple(leaves), self.router.num_experts, self.router.top_k, mask)
            grads = torch.autograd.grad(aux, leaves)
        self.value = float(aux.detach())
        self._grads = []
        for s in self.slots:
            rows = s[1].numel()
            self._grads.append([g[start:start + rows] for g in grads])
            start += rows


def _gather_rows(x: torch.Tensor, n_ranks: int) -> list[torch.Tensor]:
    """``x`` [rows, ...] of every rank, in rank order (the row counts may differ between ranks)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(n_ranks)]
    dist.all_gather(sizes, n)
    top = int(max(sizes))
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    everyone = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(everyone, padded)
    return [e[:int(s)] for e, s in zip(everyone, sizes)]
