"""What averaging LoRA factors does, and the ways to average what clients learned.

A LoRA layer adds s * B @ A to its frozen weight (s = alpha / r; (out, in) orientation, the
transpose for GPT-2's Conv1D, PEFT's `fan_in_fan_out`). Averaging A and B element-wise
(`naive`, what FlowerTune and most frameworks do) gives mean(B) @ mean(A), which is not the
mean of the clients' updates mean(B_i @ A_i). Here, on plain tensors keyed as PEFT names
parameters (`<module>.lora_A.<adapter>.weight`, `<module>.lora_B.<adapter>.weight`):

- `ProductMean` folds sum_i w_i s_i B_i @ A_i per layer as replies arrive (the exact mean
  update, for `fedex`, `svd` and the error of `naive`);
- `naive_error` is ||mean(s BA) - s mean(B) mean(A)|| / ||mean(s BA)|| over all layers;
- `residual` is what FedEx-LoRA folds into the frozen weights so the model is exact;
- `refactor` is FlexLoRA's truncated SVD of the mean update to any client's rank.
`ffa` and `rolora` need none of this: with one factor frozen and identical everywhere the
element-wise mean of the other is already exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

A_PART, B_PART = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class Pair:
    """One adapted layer: its module path and the keys of its two factors."""

    module: str
    a: str
    b: str


def pairs(keys) -> list[Pair]:
    """Every lora_A key with its lora_B key, in key order; other keys (a classifier head
    PEFT trains along) belong to no pair. A factor without its partner is an error."""
    a_keys = {k.split(A_PART)[0]: k for k in keys if A_PART in k}
    b_keys = {k.split(B_PART)[0]: k for k in keys if B_PART in k}
    if a_keys.keys() != b_keys.keys():
        odd = sorted(a_keys.keys() ^ b_keys.keys())
        raise ValueError(f"LoRA factors without their partner: {odd[:3]}")
    return [Pair(m, a_keys[m], b_keys[m]) for m in sorted(a_keys)]


def delta(state: dict[str, torch.Tensor], pair: Pair, scaling: float) -> torch.Tensor:
    """s * B @ A in (out, in) orientation, float64: the update this layer adds."""
    return scaling * (state[pair.b].double() @ state[pair.a].double())


class ProductMean:
    """sum_i w_i s_i B_i @ A_i / sum_i w_i per layer, one reply at a time (float64: the
    exactness tests compare to 1e-5 and a residual is a small difference of big terms)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def add(self, state: dict[str, torch.Tensor], weight: float, scaling: float) -> None:
        for pair in pairs(state.keys()):
            d = delta(state, pair, scaling).mul_(weight)
            if pair.module in self.sums:
                self.sums[pair.module].add_(d)
            else:
                self.sums[pair.module] = d
        self.weight += weight

    def mean(self) -> dict[str, torch.Tensor]:
        return {m: s / self.weight for m, s in self.sums.items()}


def naive_error(
    products: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor], scaling: float
) -> float:
    """||mean(s B_i A_i) - s mean(B) mean(A)||_F / ||mean(s B_i A_i)||_F over all layers:
    how far element-wise averaging lands from the mean of what clients learned."""
    num = den = 0.0
    for pair in pairs(mean_state.keys()):
        exact = products[pair.module]
        num += float((exact - delta(mean_state, pair, scaling)).square().sum())
        den += float(exact.square().sum())
    return (num / den) ** 0.5 if den else 0.0


def residual(
    products: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """FedEx-LoRA's correction per layer, (out, in): mean(s B_i A_i) - s mean(B) mean(A).
    Added to the frozen weight, the model with the averaged factors is the exact mean."""
    return {
        pair.module: products[pair.module] - delta(mean_state, pair, scaling)
        for pair in pairs(mean_state.keys())
    }


def fold(weight: torch.Tensor, correction: torch.Tensor, fan_in_fan_out: bool) -> None:
    """Add a (out, in) correction to a frozen weight in place ((in, out) for Conv1D)."""
    with torch.no_grad():
        weight.add_((correction.T if fan_in_fan_out else correction).to(weight.dtype))


@dataclass(frozen=True)
class Factors:
    b: torch.Tensor  # (out, rank)
    a: torch.Tensor  # (rank, in)
    dropped: float  # share of the update's energy (sum of squared singular values) cut


def refactor(update: torch.Tensor, rank: int, scaling: float) -> Factors:
    """B, A of `rank` with scaling * B @ A = the best rank-`rank` approximation of `update`
    (Eckart-Young: its truncated SVD), the singular values split evenly between them so
    neither factor dwarfs the other. `scaling` (alpha / rank of the receiving client) is
    divided out here once, as that client's LoRA layer multiplies it back in."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = torch.zeros(update.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, update.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    energy = float(s.square().sum())
    dropped = float(s[k:].square().sum()) / energy if energy else 0.0
    return Factors(b.float(), a.float(), dropped)


def frozen_this_round(keys, mode: str, rnd: int) -> set[str]:
    """Keys that stay as the server sent them in round `rnd` (RoLoRA: A in odd rounds, B in
    even ones; PEFT starts B at zero, so B must train first or A gets no gradient). They
    do not travel back: the server fills them in from what it sent."""
    if mode != "rolora":
        return set()
    part = A_PART if rnd % 2 else B_PART
    return {k for k in keys if part in k}
