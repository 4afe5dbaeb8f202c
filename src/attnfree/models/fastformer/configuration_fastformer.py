"""Configuration of the causal Fastformer language model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from attnfree.layers.additive_attention import DECAY_MODES, DECAY_PER, RESIDUAL_MODES, MixerOptions
from attnfree.layers.ffn import FFN_TYPES
from attnfree.models.base import RecurrentConfig
from attnfree.models.validation import check_choice, check_divisible, check_positive, check_positive_float


@strict
class FastformerConfig(RecurrentConfig):
    r"""Causal Fastformer (additive attention) language model.

    Sizes default to the earlier ``fastformerLM`` design at its published size (11-12M parameters with the
    T5 vocabulary of 32,100 tokens). Three defaults depart from that design, each measured (docs/fastformer.md,
    "Ablations"): ``residual="raw"``, ``decay="learned"``, ``scale_logits=False``. Setting
    ``residual="normed", decay="none", scale_logits=True`` reproduces the original layer exactly. Positions: none
    by default (``position_embedding_type="none"``; the order comes from the causal pooling and its decay), so a
    model runs and serves at any length; learned positions cost BPC here (demo recipe, 3 seeds: fastformer 2.975
    learned vs 2.894 none, fastformer-conv 2.847 vs 2.811; nanoGPT recipe in docs/results/positions).

    Args (besides ``RecurrentConfig``'s: sizes, positions, dropout, initialisation, special ids):
        convolve: add a causal convolution (with residual) before attention in every layer.
        groups: groups of that convolution (1 = full, hidden_size = depthwise).
        kernel_size: K taps of that convolution (its decoding state keeps K-1 inputs).
        residual: "raw" keeps the raw residual stream through the attention block (our fix);
            "normed" reproduces the earlier design, whose block output was built on the layer-normed input.
        decay: per-head recency of the additive pooling: "none" (the design: a plain causal mean),
            "fixed" (ALiBi slopes as a score bias lambda_h * position) or "learned" (default: slopes trained
            from there; measured 3.321 -> 2.916 BPC on nanoGPT's Shakespeare recipe with the 1/sqrt(C) logit scale).
        scale_logits: divide the logits by sqrt(hidden_size), as the earlier design did (off by default: with
            tied N(0, 0.02) embeddings it makes early logits ~0 and slows learning; 3.321 -> 2.967 BPC without).
        ffn_multiplier: width of the feed-forward layer as a multiple of hidden_size.
        pool_chunk_size: chunk length C of the parallel additive-attention form (speed/memory only).

    Options toward RWKV's time and channel mixing (docs/results/ablations-2; each off by default until measured):
        pool_head_size: channels per pooling score (0: the head size; 1: a score per channel).
        decay_per: "head" or "pool_head" (slopes spread over every pool head: many time scales per head).
        bonus: a learned current-token bonus in the pooled read-out (RWKV's u).
        token_shift: q, k, v from per-channel mixes of each position's and the previous position's input.
        output_gate: a sigmoid gate (RWKV's receptance) on the mixer's output.
        ffn_type: "gelu" (the design), "sqrelu" (squared ReLU) or "channel_mix" (RWKV's: token shift, squared
            ReLU, receptance gate).
    """

    model_type = "fastformer"

    position_embedding_type: str = "none"
    convolve: bool = False
    groups: int = 1
    kernel_size: int = 4
    residual: str = "raw"
    decay: str = "learned"
    scale_logits: bool = False
    ffn_multiplier: int | float = 4
    pool_chunk_size: int = 32
    pool_head_size: int = 0
    decay_per: str = "head"
    bonus: bool = False
    token_shift: bool = False
    output_gate: bool = False
    ffn_type: str = "gelu"

    def validate_fields(self) -> None:
        """Raise ValueError naming the first invalid field."""
        super().validate_fields()
        check_positive(self, "groups", "kernel_size", "pool_chunk_size")
        check_positive_float(self, "ffn_multiplier")
        check_divisible(self, "hidden_size", "groups")
        check_choice(self, "residual", RESIDUAL_MODES)
        check_choice(self, "decay", DECAY_MODES)
        check_choice(self, "decay_per", DECAY_PER)
        check_choice(self, "ffn_type", FFN_TYPES)
        if not isinstance(self.pool_head_size, int) or self.pool_head_size < 0 or (
                self.pool_head_size and self.head_dim % self.pool_head_size):
            raise ValueError(f"FastformerConfig.pool_head_size must be 0 or divide the head size {self.head_dim}, "
                             f"got {self.pool_head_size!r}")

    @property
    def mixer_options(self) -> MixerOptions:
        return MixerOptions(self.pool_head_size, self.decay_per, self.bonus, self.token_shift, self.output_gate)


# The name used by the earlier ``fastformerLM`` package.
FastformerLMConfig = FastformerConfig
