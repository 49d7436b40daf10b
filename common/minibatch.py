"""The update's plumbing, the same in every script: epochs x minibatches x micro-batches.

    for minibatch in minibatches(policy, mask, G, num_epochs, num_minibatches, micro_size):
        for micro_rows in minibatch:                      # (b,) rows of this rank's rollout batch
            loss = aggregate_loss(..., minibatch.num_seqs, minibatch.num_tokens, ...)
            minibatch.backward(loss)
        loss, grad_norm = minibatch.step(optimizer, max_grad_norm, step, run_dir)

It keeps the distributed bookkeeping off the loss lines (docs/distributed.md), never the algorithm:
- `num_seqs` and `num_tokens` are the minibatch's over *every rank* (all-reduced): dividing by a
  micro-batch's or one rank's count is the gradient-accumulation bug of several peers, and makes
  the gradient depend on the micro-batch size or the number of processes;
- DDP and FSDP2 all-reduce the gradients in the last micro-batch's backward only (`grad_sync`,
  set before that micro-batch's forward);
- DDP and FSDP2 *average* the ranks' gradients; each rank's loss already divides by the global
  count, so `backward` runs on loss x world size, and the average is the sum over ranks;
- `step` clips by the global norm, stops the run at a non-finite loss or gradient (before the
  optimizer applies it), and takes the optimizer step.
Under plain python (one process) every collective is the identity.
"""

import torch

from common.checkpoint import stop_if_not_finite
from common.distributed import all_reduce, clip_grad_norm, grad_sync, world_size


class Minibatch:
    """One optimizer step's rows: iterate it for micro-batches, `backward` each loss, then `step`.

    rows (mb,): indices into this rank's rollout batch, whole groups; num_seqs, num_tokens: the
    minibatch's sequence and valid-token counts summed over all ranks (the loss normalisers)."""

    def __init__(self, models, rows: torch.Tensor, mask: torch.Tensor, micro_size: int):
        self.models = models if isinstance(models, (list, tuple)) else [models]
        self.rows = rows  # (mb,)
        self.num_seqs = len(rows) * world_size()
        self.num_tokens = int(all_reduce(mask[rows].sum()).clamp(min=1))
        self.micro_batches = rows.split(micro_size)
        self.loss_sum, self.part_sums = 0.0, {}

    def __iter__(self):
        for i, micro_rows in enumerate(self.micro_batches):
            for model in self.models:  # gradients are all-reduced in the last micro-batch's backward only
                grad_sync(model, last=i == len(self.micro_batches) - 1)
            yield micro_rows

    def backward(self, loss: torch.Tensor, **parts: torch.Tensor):
        """Accumulate d loss; the ranks' gradients are averaged, so x world size makes them a sum.
        parts: terms of the loss to log as well (PPO's value_loss), summed like it: `parts` after `step`."""
        (loss * world_size()).backward()
        self.loss_sum += loss.item()
        for name, part in parts.items():
            self.part_sums[name] = self.part_sums.get(name, 0.0) + part.item()

    def step(self, optimizers, max_grad_norm: float, step: int, run_dir: str) -> tuple[float, float]:
        """Clip each model by its global gradient norm, stop at a non-finite value, step, zero the gradients.
        Returns (the minibatch's loss summed over ranks, the first model's gradient norm before clipping);
        every model's norm is then in `grad_norms`, and each part given to `backward`, summed over ranks, in `parts`."""
        optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
        grad_norms = [clip_grad_norm(model, max_grad_norm) for model in self.models]
        loss = all_reduce(self.loss_sum)
        self.grad_norms = [float(g) for g in grad_norms]
        self.parts = {name: all_reduce(total) for name, total in self.part_sums.items()}
        stop_if_not_finite(step, run_dir, loss=loss, grad_norm=grad_norms[0],
                           **{f"grad_norm_{i}": g for i, g in enumerate(grad_norms[1:], start=1)})
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss, float(grad_norms[0])


def minibatches(models, mask: torch.Tensor, group_size: int, num_epochs: int, num_minibatches: int,
                micro_size: int):
    """num_epochs passes over this rank's rollout batch, each cut into num_minibatches minibatches of
    whole groups (shuffled per epoch when there is more than one; one minibatch keeps the batch's
    order), each iterated in micro-batches of micro_size rows. mask (B, C): the completion tokens
    that count. REINFORCE and SFT use 1 x 1: one optimizer step on the whole batch."""
    num_groups = len(mask) // group_size
    for _ in range(num_epochs):
        order = torch.randperm(num_groups) if num_minibatches > 1 else torch.arange(num_groups)
        for groups in order.chunk(num_minibatches):
            rows = (groups[:, None] * group_size + torch.arange(group_size)).flatten()  # (mb,)
            yield Minibatch(models, rows, mask, micro_size)
