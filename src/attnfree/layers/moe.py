"""Sparsely gated mixture of experts: a drop-in for the feed-forward block (pre-LN inside, residual by the caller).

Routing follows Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5:

    H(x)_e = (x W_g)_e + eps_e * softplus((x W_noise)_e),  eps ~ N(0, noise^2)   (noise in training only)
    G(x)   = softmax(KeepTopK(H(x), k))                 (the k chosen experts' combine weights)
    y      = sum over chosen e of G(x)_e * E_e(x)

Capacity (Switch Transformer, Fedus et al. 2021): in training each expert takes at most
``ceil(capacity_factor * N * k / E)`` of the N routed tokens' assignments; the rest are dropped from that
expert (the token passes on through the residual) and counted. Assignments queue in time-major order
(every row's step t before any row's step t+1), so a token is never pushed out by a later token: the
model stays causal in training. At evaluation there is no capacity limit: a token's output never depends
on the other tokens in the batch, which is what decoding with a recurrent state requires.

Load balancing (Switch eq. 4-6): aux = E * sum_e f_e P_e, f_e = fraction of assignments routed to e,
P_e = mean router probability of e; 1.0 when balanced. Padding tokens are not routed and not counted.
As a sublayer it returns the branch and appends its ``RoutingStats`` to ``ctx.reports``; it keeps no state.
Shapes: B batch, T time, C width, N routed tokens, E experts, k = top_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfree.layers.ffn import ACTIVATIONS
from attnfree.layers.sublayer import BlockContext, Sublayer, SublayerState, forced_path
from attnfree.layers.validation import check_mode


@dataclass
class RoutingStats:
    """What one MoE layer reports about a forward pass."""

    aux_loss: Tensor  # scalar, E * sum_e f_e P_e (differentiable through P)
    tokens_per_expert: Tensor  # [E] long, assignments each expert processed (after capacity)
    dropped: Tensor  # scalar long, assignments dropped by the capacity limit


class Expert(nn.Module):
    """One feed-forward expert, without the LayerNorm (the MoE normalises once, before routing)."""

    def __init__(self, hidden_size: int, multiplier: float, activation: str):
        super().__init__()
        inner = round(multiplier * hidden_size)
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class NoisyTopKRouter(nn.Module):
    """H(x) = x W_g + eps * softplus(x W_noise), eps ~ N(0, noise^2) in training; x W_g at evaluation."""

    def __init__(self, hidden_size: int, n_experts: int, noise: float):
        super().__init__()
        self.noise = noise
        self.gate = nn.Linear(hidden_size, n_experts, bias=False)
        self.noise_gate = nn.Linear(hidden_size, n_experts, bias=False) if noise > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C] -> router logits [N, E]."""
        clean = self.gate(x)
        if not self.training or self.noise_gate is None:
            return clean  # deterministic routing at evaluation
        return clean + torch.randn_like(clean) * self.noise * F.softplus(self.noise_gate(x))


class SparseMoE(Sublayer):
    """Pre-LN noisy top-k mixture of experts: x [B, T, C] -> [B, T, C], its ``RoutingStats`` into ``ctx.reports``.

    Two paths with the same values at evaluation: "sparse" (each expert on its routed tokens; training, with the
    capacity limit) and "dense" (every expert everywhere, combined by the gates: no data-dependent shapes, what a
    traced graph needs). Automatic: dense at evaluation under torch.compile, else sparse (``use_path`` forces one).
    """

    def __init__(self, hidden_size: int, multiplier: float, activation: str, n_experts: int, top_k: int,
                 capacity_factor: float, noise: float, dropout: float, eps: float):
        super().__init__()
        check_mode("SparseMoE.activation", activation, ACTIVATIONS)
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.router = NoisyTopKRouter(hidden_size, n_experts, noise)
        self.experts = nn.ModuleList([Expert(hidden_size, multiplier, activation) for _ in range(n_experts)])
        self.dropout = nn.Dropout(dropout)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def capacity(self, n_tokens: int) -> int:
        """Assignments one expert takes: ceil(capacity_factor * N * k / E) in training, unlimited at evaluation."""
        if not self.training:
            return n_tokens * self.top_k
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: Tensor, ctx: BlockContext, state: SublayerState | None = None) -> Tensor:
        y, stats = self.route(x, ctx.mask)
        ctx.reports.append(stats)
        return y

    def route(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingStats]:
        """The output and the routing statistics, by the path ``path`` chooses."""
        if self.path() == "dense":
            if self.training:
                raise ValueError("the dense mixture-of-experts path has no capacity limit: evaluation only")
            return self.dense_forward(x, mask)
        return self.sparse_forward(x, mask)

    def path(self) -> str:
        """"sparse" or "dense": the forced one (``use_path``), else dense at evaluation under torch.compile."""
        forced = forced_path()
        if forced in ("sparse", "dense"):
            return forced
        return "dense" if torch.compiler.is_compiling() and not self.training else "sparse"

    def dense_forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingStats]:
        """Evaluation without data-dependent shapes (what an exported graph needs): every expert on every position,
        combined by the gate weights, which are zero outside each token's top k. The same values as the sparse
        dispatch at evaluation (no capacity limit there); E times the expert work."""
        E, k = self.n_experts, self.top_k
        n = self.norm(x)  # [B, T, C]
        logits = self.router(n)  # [B, T, E]
        top_logits, top_experts = logits.topk(k, dim=-1)  # [B, T, k]
        gates = torch.zeros_like(logits).scatter(-1, top_experts, torch.softmax(top_logits, dim=-1))  # [B, T, E]
        real = torch.ones_like(logits[..., :1]) if mask is None else mask[..., None].to(logits.dtype)  # [B, T, 1]
        y = sum(gates[..., e:e + 1] * expert(n) for e, expert in enumerate(self.experts)) * real  # [B, T, C]
        chosen = F.one_hot(top_experts, E).sum(-2) * real.long()  # [B, T, E]
        N = real.sum().clamp_min(1)
        f = chosen.sum((0, 1)).to(logits.dtype) / (N * k)
        P = (torch.softmax(logits, dim=-1) * real).sum((0, 1)) / N
        stats = RoutingStats(aux_loss=E * (f * P).sum(), tokens_per_expert=chosen.sum((0, 1)),
                             dropped=torch.zeros((), dtype=torch.long, device=x.device))
        return self.dropout(y), stats  # type: ignore[arg-type]

    def sparse_forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingStats]:
        """Each expert on its routed tokens only (the training path: capacity limits, dropped assignments)."""
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        # 1. the routed tokens (not padding), in time-major order: [N, C]
        flat = self.norm(x).transpose(0, 1).reshape(T * B, C)
        routed = (torch.arange(T * B, device=x.device) if mask is None
                  else mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1))  # [N]
        xr = flat[routed]
        N = xr.shape[0]
        # 2. gate: the top-k experts of each token and their combine weights
        logits = self.router(xr)  # [N, E]
        top_logits, top_experts = logits.topk(k, dim=-1)  # [N, k]
        weights = torch.softmax(top_logits, dim=-1).reshape(-1)  # [N k]
        # 3. capacity: each assignment's place in its expert's queue (token order, then slot)
        assigned = top_experts.reshape(-1)  # [N k]
        onehot = F.one_hot(assigned, E)  # [N k, E]
        place = (onehot.cumsum(0) * onehot).sum(-1) - 1  # [N k]
        kept = place < self.capacity(N)
        # 4. each expert on its kept tokens, weighted and summed back per token
        token = torch.arange(N, device=x.device).repeat_interleave(k)  # [N k]
        out = torch.zeros_like(xr)
        for e, expert in enumerate(self.experts):
            take = ((assigned == e) & kept).nonzero().squeeze(1)
            if take.numel():
                out = out.index_add(0, token[take], expert(xr[token[take]]) * weights[take, None])
        # 5. back to [B, T, C]; padding positions get 0
        y = torch.zeros_like(flat).index_copy(0, routed, out).view(T, B, C).transpose(0, 1)
        # 6. load balancing (Switch eq. 4-6) and counts
        f = onehot.sum(0).to(logits.dtype) / max(N * k, 1)  # [E]
        P = torch.softmax(logits, dim=-1).sum(0) / max(N, 1)  # [E]
        stats = RoutingStats(aux_loss=E * (f * P).sum(), tokens_per_expert=(onehot * kept[:, None]).sum(0),
                             dropped=(~kept).sum())
        return self.dropout(y), stats
