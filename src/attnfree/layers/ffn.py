"""Pre-LayerNorm feed-forward block (no biases), the 'boom' layer of the Fastformer design."""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


class FeedForward(nn.Module):
    """x -> dropout(W2 act(W1 LayerNorm(x))), the residual added by the caller. x: [B, T, C]."""

    def __init__(self, hidden_size: int, multiplier: int, activation: str, dropout: float, eps: float):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, multiplier * hidden_size, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(multiplier * hidden_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(self.act(self.up(self.norm(x)))))
