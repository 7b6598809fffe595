"""A linear head under a perturbed forward: its output computed one span of W ± εz at a
time (no full scratch copy), and for a token-level loss a running log-softmax over those
spans (`label_logprob_sums`), with each span built once and no position's full logits
held at once. `PerturbedHead` is a mixin of `Perturbation` (edgezo.zo.perturb)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgezo.zo import chunking, workers
from edgezo.zo.batch import LOGIT_CHUNK_VALUES, join_pair, split_pair
from edgezo.zo.blocks import Unit
from edgezo.zo.optimizers import work_dtype
from edgezo.zo.staging import static


class LogSumExp:
    """A running log-softmax over the head's output spans, at every position of `x`,
    with the logit of each position's target kept when its span comes by."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor):
        # contiguous: a strided input makes F.linear copy the weight span for every row
        self.x, self.targets = x.contiguous(), targets.clamp(min=0)
        shape, dtype = targets.shape, torch.promote_types(x.dtype, torch.float32)
        self.top = torch.full(shape, float("-inf"), dtype=dtype, device=x.device)
        self.total = torch.zeros(shape, dtype=dtype, device=x.device)
        self.picked = torch.zeros(shape, dtype=dtype, device=x.device)
        self.exact: torch.Tensor | None = None  # target logits computed apart
        self._by_span: tuple[torch.Tensor, list[int]] | None = None

    def targets_in(self, starts: list[int], k: int) -> torch.Tensor:
        """Flat indices of the positions whose target lies in span k of the spans that
        begin at `starts`: one sort, and one host sync, per head call."""
        if self._by_span is None:
            flat = self.targets.reshape(-1)
            edges = torch.tensor(starts[1:], dtype=flat.dtype, device=flat.device)
            span = torch.searchsorted(edges, flat, right=True)
            ends = torch.bincount(span, minlength=len(starts)).cumsum(0).tolist()
            self._by_span = torch.argsort(span, stable=True), [0, *ends]
        order, ends = self._by_span
        return order[ends[k]:ends[k + 1]]

    def exact_targets(self, starts: list[int], k: int, weight: torch.Tensor,
                      z: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        """Compute in fp32, from weight + scale·z unrounded, the logits of the targets in
        span k (rows from starts[k], z its noise): add() then uses them in place of the
        half-precision products' own values.

        Why: the head at every position in fp32 makes a token-level loss's step slow; the
        normaliser averages the products' rounding over the vocabulary, while the target's
        own logit carries L(θ+εz) − L(θ−εz) at full precision (the projected gradients'
        difference from an fp32 head: BENCHMARKS.md, "Generative tasks").
        Each position's target lies in one span, so the whole head costs one row a
        position."""
        positions, lo = self.targets_in(starts, k), starts[k]
        local = self.targets.reshape(-1)[positions] - lo
        w = weight[lo + local].float().add_(z[local].float(), alpha=scale)
        values = (self.x.reshape(-1, self.x.shape[-1])[positions].float() * w).sum(-1)
        if bias is not None:
            values += bias[local].float()
        if self.exact is None:
            self.exact = torch.zeros(self.targets.shape, dtype=self.top.dtype,
                                     device=self.top.device)
        self.exact.view(-1)[positions] = values.to(self.exact.dtype)

    def exact_everywhere(self, weight: torch.Tensor, z: torch.Tensor, scale: float,
                         bias: torch.Tensor | None) -> None:
        """exact_targets for every position, `z` the noise at each position's target row
        (Direction.rows), a fixed block of positions at a time (fp32 rows of at most
        LOGIT_CHUNK_VALUES values): no host read and no shape the data decides (a CUDA
        graph's forward). The same arithmetic for each position as exact_targets (equal
        on the CPU; a GPU's reduction may round a block's sums otherwise)."""
        flat, hidden = self.targets.reshape(-1), self.x.shape[-1]
        x = self.x.reshape(-1, hidden)
        exact = torch.empty(flat.numel(), dtype=self.top.dtype, device=self.top.device)
        per = max(1, LOGIT_CHUNK_VALUES // hidden)
        for lo in range(0, flat.numel(), per):
            rows = flat[lo:lo + per]
            w = weight[rows].float().add_(z[lo:lo + per].float(), alpha=scale)
            values = (x[lo:lo + per].float() * w).sum(-1)
            if bias is not None:
                values += bias[rows].float()
            exact[lo:lo + per] = values
        self.exact = exact.view(self.targets.shape)

    def add(self, logits: torch.Tensor, lo: int, hi: int, block: slice) -> None:
        """Fold in the logits of output rows [lo, hi) at the positions `block`."""
        targets = self.targets[:, block]
        inside = (targets >= lo) & (targets < hi)
        local = (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1)
        target_logits = logits.gather(-1, local).squeeze(-1)
        if self.exact is not None:
            target_logits = torch.where(inside, self.exact[:, block], target_logits)
            logits.scatter_(-1, local, target_logits.unsqueeze(-1))
        old = self.top[:, block]
        top = torch.maximum(old, logits.amax(-1))
        self.total[:, block].mul_(torch.exp(old - top)).add_(
            torch.exp(logits - top.unsqueeze(-1)).sum(-1))
        self.top[:, block] = top
        picked = self.picked[:, block]
        picked.copy_(torch.where(inside, target_logits, picked))

    def logprobs(self) -> torch.Tensor:
        return self.picked - self.top - torch.log(self.total)


class PerturbedHead:
    """The linear head's perturbed forward and its label log-probabilities."""

    def _head_biases(self, head: torch.nn.Linear, slots: dict[str, int]
                     ) -> list[torch.Tensor | None]:
        """The head's bias for each sign: b ± εz_b where the direction covers it."""
        if "bias" in slots and self.direction.covers(slots["bias"]):
            biases = [torch.empty_like(head.bias) for _ in self.signs]
            self._fill([(slots["bias"], biases)])
            return biases
        return [None if head.bias is None else head.bias.detach()] * len(self.signs)

    def _linear(self, unit: Unit, args, kwargs):
        """y = x (W ± εz)ᵀ + (b ± εz_b), one row-chunk (span, on CUDA) of W at a time (no
        full scratch)."""
        module: torch.nn.Linear = unit.module  # type: ignore[assignment]
        x = args[0] if args else kwargs["input"]
        slots = dict(unit.slots)
        weight = module.weight.detach()
        w_index = slots["weight"]
        biases = self._head_biases(module, slots)
        if len(self.signs) == 1:
            inputs = [x]
        elif x.dim() >= 2 and x.shape[0] == self.pair_rows:
            inputs = list(split_pair(x, self.pair_rows))
        else:
            inputs = [x, x]
        # A half-precision head computes in fp32 with θ ± εz unrounded: the loss difference
        # a ZO estimate reads must not drown in the logits' rounding (schemes._fp32_logits).
        half = weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if half else x.dtype
        inputs = [xi.float() if half else xi for xi in inputs]
        outs = [torch.empty(*xi.shape[:-1], weight.shape[0], dtype=dtype, device=x.device)
                for xi in inputs]
        bounds = chunking.spans(weight.shape, weight.device)

        def block(i: int) -> None:
            k, end, lo, hi = bounds[i]
            z = self.direction.chunk(weight.shape, w_index, k, weight.device,
                                     dtype=work_dtype(weight.dtype), end=end)
            w = workers.thread_buffer("w", z.numel(), dtype, weight.device).view(z.shape)
            for xi, out, s, b in zip(inputs, outs, self.signs, biases, strict=True):
                torch.add(weight[lo:hi], z, alpha=s * self.eps, out=w)
                out[..., lo:hi] = F.linear(xi, w, None if b is None else b[lo:hi].to(dtype))

        workers.parallel_map(block, range(len(bounds)), weight.device, self.direction.draws())
        return outs[0] if len(outs) == 1 else join_pair(outs[0], outs[1], self.pair_rows // 2)

    def label_logprob_sums(self, head: torch.nn.Module, hidden: torch.Tensor,
                           targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Σ over each row's labelled positions of log p(target), for a linear head under
        the perturbed forward (None when it is not perturbed now: the loss applies it).

        A token-level loss reads the head at every position; applied a chunk of positions
        at a time, it would rebuild every span of W ± εz once per chunk. Here each span
        is built once, its logits computed for every position, and the log-softmax kept
        as a running log-sum-exp over the spans: no full logits, no repeated span."""
        unit = self._installed.get(id(head), (None,))[0]
        if (not self.active or unit is None or unit.kind != "linear"
                or not self.direction.covers(dict(unit.slots)["weight"])):
            return None
        self._apply_pending([i for _, i in unit.slots])
        slots = dict(unit.slots)
        weight, w_index = head.weight.detach(), slots["weight"]
        biases = self._head_biases(head, slots)
        parts = ([(hidden, targets)] if len(self.signs) == 1 else
                 list(zip(split_pair(hidden, self.pair_rows),
                          split_pair(targets, self.pair_rows), strict=True)))
        # fp16 products are slow on most CPUs: there the head computes in fp32, unrounded
        dtype = (torch.float32 if weight.dtype == torch.float16 and weight.device.type == "cpu"
                 else weight.dtype)
        rounded = dtype in (torch.float16, torch.bfloat16)
        states = [LogSumExp(x.to(dtype), t) for x, t in parts]
        if rounded and static():  # a CUDA graph's: every target's logit at once
            for state, s, b in zip(states, self.signs, biases, strict=True):
                z = self.direction.rows(weight.shape, w_index, state.targets.reshape(-1),
                                        work_dtype(weight.dtype))
                state.exact_everywhere(weight, z, s * self.eps,
                                       None if b is None else b.to(dtype))
        spans = chunking.spans(weight.shape, weight.device)
        starts = [lo for _, _, lo, _ in spans]
        for span, (k, end, lo, hi) in enumerate(spans):
            z = self.direction.chunk(weight.shape, w_index, k, weight.device,
                                     dtype=work_dtype(weight.dtype), end=end)
            w = workers.thread_buffer("w", z.numel(), dtype, weight.device).view(z.shape)
            for state, s, b in zip(states, self.signs, biases, strict=True):
                torch.add(weight[lo:hi], z, alpha=s * self.eps, out=w)
                bias = None if b is None else b[lo:hi].to(dtype)
                if rounded and not static():  # targets' logits in fp32, unrounded
                    state.exact_targets(starts, span, weight, z, s * self.eps, bias)
                # at most LOGIT_CHUNK_VALUES logits at once, as the unperturbed loss
                per = max(1, LOGIT_CHUNK_VALUES // (state.x.shape[0] * (hi - lo)))
                for p0 in range(0, state.x.shape[1], per):
                    block = slice(p0, p0 + per)
                    logits = F.linear(state.x[:, block], w, bias).to(state.top.dtype)
                    state.add(logits, lo, hi, block)
        logp = torch.cat([state.logprobs() for state in states])
        return (logp * mask).sum(1)
