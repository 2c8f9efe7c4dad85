"""fp32 master copies of 16-bit trainable weights.

A model loaded in bf16 (``model.dtype: bfloat16``, or a bf16 model object handed to ``train``)
halves the memory of its weights and of every activation, but an optimizer that steps the bf16
weights themselves loses every update smaller than half a bf16 step of the weight (1/256 of it):
at DPO learning rates (1e-7 to 1e-5) that is nearly all of them, and such a run "trains" without
moving. With master weights the optimizer steps fp32 copies of the 16-bit parameters and the model
receives the updated values rounded to its dtype after every step, as mixed-precision training does.

Memory per 16-bit trainable parameter: 2 (weight) + 2 (gradient, freed once copied) + 4 (master)
+ 8 (AdamW) bytes, the same as an fp32 model, with 16-bit activations. fp32 parameters are used
as they are (no copy). The master copies are part of the checkpoint (exact resume).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    def __init__(self, params: list[torch.Tensor], enabled: bool = True):
        self.params = params
        self.master = [p.detach().float().clone().requires_grad_(True)
                       if enabled and p.dtype in LOW_PRECISION else p for p in params]

    @property
    def active(self) -> bool:
        return any(m is not p for p, m in zip(self.params, self.master))

    def optimizer_params(self) -> list[torch.Tensor]:
        """What the optimizer steps: the fp32 copies (and the fp32 parameters themselves)."""
        return self.master

    def grads_in(self) -> None:
        """Add the model's gradients to the master copies' (in fp32) and free them: after each
        micro-batch's backward, so that accumulation sums in fp32."""
        for p, m in zip(self.params, self.master):
            if m is not p and p.grad is not None:
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def weights_out(self) -> None:
        """Round the stepped master copies into the model's weights, after the optimizer step."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                p.copy_(m)

    def state(self) -> list[torch.Tensor]:
        """The fp32 copies, in parameter order (for the checkpoint)."""
        return [m.detach() for p, m in zip(self.params, self.master) if m is not p]

    @torch.no_grad()
    def from_model(self) -> None:
        """Master copies = the model's weights (after loading a checkpoint written without them)."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.copy_(p)

    @torch.no_grad()
    def load_state(self, tensors: list[torch.Tensor]) -> None:
        copies = [m for p, m in zip(self.params, self.master) if m is not p]
        if len(copies) != len(tensors):
            raise ValueError(f"the checkpoint holds {len(tensors)} master weights, this model needs {len(copies)}")
        for m, t in zip(copies, tensors):
            m.copy_(t)
