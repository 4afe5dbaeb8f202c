"""Generate text from an ONNX export (``attnfree export``) with onnxruntime and numpy alone: no torch.

This file imports nothing from attnfree and nothing that imports torch: ``attnfree export`` copies it into the
export folder, so a deployment needs only ``numpy``, ``onnxruntime`` (and ``tokenizers`` for a BPE vocabulary):

    python EXPORT_DIR/runtime.py EXPORT_DIR --prompt "ROMEO:" --max-new-tokens 200
    python -m attnfree.inference.runtime EXPORT_DIR --prompt "ROMEO:" --greedy        (same, from an installed attnfree;
                                                                             importing the package loads torch)

In Python::

    lm = OnnxLM.load("export_dir")              # quantized=True for the int8 graphs
    logits, state = lm.prefill([[5, 6, 7]])      # [B, V], the recurrent state after the prompt
    logits, state = lm.step(np.array([8]), state)
    for piece in lm.generate("ROMEO:", max_new_tokens=50, greedy=True):
        print(piece, end="")

Decoding is a prefill of the (left-padded) prompt, then one step graph call per token; the state is a list of
arrays in the order of the manifest's ``state`` entries. Glossary: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

FORMAT, FORMAT_VERSIONS = "attnfree-onnx", (1, 2)  # 1: no score graph (the prefill returns all_logits too)
State = list[np.ndarray]


# ----------------------------------------------------------------------------------------------
# Tokenizers (the two kinds an export records)
# ----------------------------------------------------------------------------------------------


class ByteCodec:
    """UTF-8 bytes are ids 0..255; ids above (pad, bos, eos) decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class TokenizersCodec:
    """A ``tokenizers`` JSON file (byte-level BPE): no special tokens added, specials skipped on decode."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=True))


def load_codec(folder: Path, record: dict[str, Any]) -> ByteCodec | TokenizersCodec:
    kind = record.get("kind")
    if kind == "byte":
        return ByteCodec()
    if kind == "tokenizers":
        return TokenizersCodec(folder / record["folder"] / "tokenizer.json")
    raise ValueError(f"manifest tokenizer.kind must be 'byte' or 'tokenizers', got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Sampling in numpy (the same rules as attnfree.inference.sampling.distribution)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. greedy=True ignores the rest."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pick_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> next ids [B]: argmax, or a draw after temperature, top-k and top-p (nucleus) filtering."""
    if sampling.greedy:
        return logits.argmax(-1).astype(np.int64)
    # 1. temperature (after subtracting the largest: no inf - inf for a tiny one), then keep the k largest
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature: -inf for all but the largest (greedy up to ties)
        z = (z - z.max(-1, keepdims=True)) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(z, -1)[:, -min(sampling.top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    # 2. keep the smallest prefix (by probability) whose mass reaches top_p
    if sampling.top_p < 1.0:
        order = np.argsort(-z, -1)
        p = _softmax(np.take_along_axis(z, order, -1))
        drop_sorted = np.cumsum(p, -1) - p > sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        z = np.where(drop, -np.inf, z)
    # 3. one draw per row
    p = _softmax(z)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """The export's manifest, checked (format, version and, with verify, every file's size and sha256)."""
    root = Path(folder)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {root}: not an attnfree ONNX export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in FORMAT_VERSIONS:
        raise ValueError(f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                         f"this runtime reads {FORMAT!r} versions {', '.join(map(str, FORMAT_VERSIONS))}")
    for name, record in manifest["files"].items() if verify else ():
        file = root / name
        if not file.is_file():
            raise FileNotFoundError(f"export file {file} listed in the manifest is missing")
        if file.stat().st_size != record["bytes"] or _sha256(file) != record["sha256"]:
            raise ValueError(f"export file {file} does not match its manifest entry (size or sha256)")
    return manifest


class OnnxLM:
    """The exported graphs, the tokenizer and the manifest of one model.

    The prefill and step sessions open with the model; the scoring graph (every position's logits) opens on the
    first ``score``. The graphs' weights are one shared file (``weights.bin``), which onnxruntime maps.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], prefill: ort.InferenceSession,
                 step: ort.InferenceSession, options: ort.SessionOptions | None = None, suffix: str = ""):
        self.folder, self.manifest = folder, manifest
        self.prefill_session, self.step_session = prefill, step
        self._options, self._suffix, self._score_session = options, suffix, None
        self.codec = load_codec(folder, manifest["tokenizer"])
        self.state_names = [s["name"] for s in manifest["state"]]
        self.max_positions: int | None = manifest["max_positions"]
        self.vocab_size: int = manifest["vocab_size"]
        self.bos_token_id, self.eos_token_id = manifest["bos_token_id"], manifest["eos_token_id"]
        self.pad_token_id: int = manifest["pad_token_id"]
        self._prefill_outputs = ["logits", *(f"new_state.{n}" for n in self.state_names)]

    @classmethod
    def load(cls, folder: str | Path, quantized: bool = False, threads: int | None = None,
             verify: bool = True) -> OnnxLM:
        """Open an export folder. quantized: use the int8 graphs (export with ``--quantize int8``);
        threads: onnxruntime intra-op threads (None: its default); verify: check file hashes."""
        root = Path(folder)
        manifest = read_manifest(root, verify)
        graphs = manifest["graphs"]
        suffix = ".int8" if quantized else ""
        if quantized and "step.int8" not in graphs:
            raise ValueError(f"{root} has no int8 graphs: export with --quantize int8")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        sessions = [cls._session(root / graphs[name + suffix], options) for name in ("prefill", "step")]
        return cls(root, manifest, sessions[0], sessions[1], options, suffix)

    @staticmethod
    def _session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @property
    def score_session(self) -> ort.InferenceSession:
        """The graph of every position's logits: ``score.onnx`` (opened on first use), or in a version-1 export
        the prefill graph, whose ``all_logits`` output it is."""
        graphs = self.manifest["graphs"]
        if "score" not in graphs:
            return self.prefill_session
        if self._score_session is None:
            self._score_session = self._session(self.folder / graphs["score" + self._suffix],
                                                self._options or ort.SessionOptions())
        return self._score_session

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_positions(self, last: int) -> None:
        if self.max_positions is not None and last >= self.max_positions:
            raise ValueError(f"position {last} is beyond the model's n_positions={self.max_positions} (learned "
                             f"position embeddings): shorten the prompt or generate fewer tokens")

    def _check_prompt(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = np.asarray(input_ids, dtype=np.int64), np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape != mask.shape:
            raise ValueError(f"input_ids and attention_mask must be the same [B, T] with T >= 1, got "
                             f"{ids.shape} and {mask.shape}")
        self._check_ids(ids)
        self._check_positions(int(mask.sum(-1).max()) - 1)
        return {"input_ids": ids, "attention_mask": mask}

    def run_prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, State]:
        """input_ids, attention_mask [B, T] (left padding) -> (last-position logits [B, V], state)."""
        out = self.prefill_session.run(self._prefill_outputs, self._check_prompt(input_ids, attention_mask))
        return out[0], out[1:]

    def all_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask [B, T] (left padding) -> every position's logits [B, T, V]."""
        feed = self._check_prompt(input_ids, attention_mask)
        return np.asarray(self.score_session.run(["all_logits"], feed)[0])

    def prefill(self, prompts: Sequence[Sequence[int]] | np.ndarray) -> tuple[np.ndarray, State]:
        """Token id lists of any lengths (left-padded here) -> (last-position logits [B, V], state)."""
        rows = [list(map(int, p)) for p in prompts]
        if not rows or min(len(r) for r in rows) == 0:
            raise ValueError("prefill needs at least one prompt, each of at least one token")
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
        return self.run_prefill(ids, mask)

    def step(self, tokens: np.ndarray | Sequence[int], state: State) -> tuple[np.ndarray, State]:
        """One token per sequence: tokens [B] and the state -> (logits [B, V], new state)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if len(state) != len(self.state_names):
            raise ValueError(f"state must hold {len(self.state_names)} arrays, got {len(state)}")
        self._check_ids(ids)
        self._check_positions(int(state[self.state_names.index("positions")].max()))
        feed = {"input_ids": ids, **{f"state.{n}": s for n, s in zip(self.state_names, state)}}
        out = self.step_session.run(None, feed)
        return out[0], out[1:]

    def score(self, tokens: Sequence[int] | np.ndarray, block_size: int, batch_size: int = 16,
              bos: bool = True) -> tuple[float, int]:
        """Total next-token cross-entropy (nats) over a token stream and the number of scored tokens.

        The protocol of ``attnfree.evaluation.bpc.evaluate_bpc`` with stride = block_size: the stream (BOS first, so
        the first token is predicted) is cut into non-overlapping windows of ``block_size`` inputs, each
        predicting its next tokens; the last, shorter window counts too. BPC = nats / characters / ln 2.
        """
        stream = np.asarray(([self.bos_token_id] if bos else []) + [int(t) for t in tokens], dtype=np.int64)
        n = len(stream) - 1
        if n < 1 or block_size < 1:
            raise ValueError(f"need at least one target and block_size >= 1, got {n} targets, block {block_size}")
        starts = list(range(0, n, block_size))
        full = [b for b in starts if b + block_size <= n]
        total = 0.0
        groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
        groups += [[b] for b in starts if b + block_size > n]  # the short last window alone
        for group in groups:
            T = min(block_size, n - group[0])
            ids = np.stack([stream[b:b + T] for b in group])  # [B, T]
            targets = np.stack([stream[b + 1:b + T + 1] for b in group])  # [B, T]
            logits = self.all_logits(ids, np.ones_like(ids))  # [B, T, V]
            z = logits.astype(np.float64)
            top = z.max(-1, keepdims=True)
            log_norm = np.log(np.exp(z - top).sum(-1)) + top[..., 0]
            total += float((log_norm - np.take_along_axis(z, targets[..., None], -1)[..., 0]).sum())
        return total, n

    # ---- generation ---------------------------------------------------------------------------

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling | None = None,
                     seed: int | None = 0, eos_token_id: int | None = None) -> Iterator[np.ndarray]:
        """Yield the next ids [B] per step: prefill once, then one step call per token. Stops after
        ``max_new_tokens`` or when every row has produced ``eos_token_id``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        longest = max((len(p) for p in prompts), default=0)
        if self.max_positions is not None and longest + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"n_positions={self.max_positions}")
        sampling, rng = sampling or Sampling(), np.random.default_rng(seed)
        logits, state = self.prefill(prompts)
        done = np.zeros(len(prompts), dtype=bool)
        for i in range(max_new_tokens):
            token = pick_next(logits, sampling, rng)
            yield token
            if eos_token_id is not None:
                done |= token == eos_token_id
                if done.all():
                    return
            if i + 1 < max_new_tokens:  # the last token needs no step
                logits, state = self.step(token, state)

    def generate(self, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, greedy: bool = False, seed: int | None = 0) -> Iterator[str]:
        """Continue ``prompt`` (empty: start from BOS), yielding text pieces as tokens come (a piece that ends
        inside a UTF-8 character is held back until the next token completes it). Stops at EOS."""
        ids = self.codec.encode(prompt) or [self.bos_token_id]
        sampling = Sampling(temperature, top_k, top_p, greedy)
        new: list[int] = []
        printed = 0
        for token in self.generate_ids([ids], max_new_tokens, sampling, seed, self.eos_token_id):
            new.append(int(token[0]))
            text = self.codec.decode(new)
            if not text.endswith("\ufffd"):
                yield text[printed:]
                printed = len(text)
        text = self.codec.decode(new)
        if len(text) > printed:
            yield text[printed:]


def main(argv: Sequence[str] | None = None) -> int:
    """``python runtime.py EXPORT_DIR --prompt ...``: stream a continuation to stdout."""
    p = argparse.ArgumentParser(prog="attnfree-runtime", description="Generate text from an attnfree ONNX export "
                                "with onnxruntime (no torch).")
    p.add_argument("folder", help="the export folder (holds manifest.json)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantized", action="store_true", help="use the int8 graphs")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    ns = p.parse_args(argv)
    try:
        lm = OnnxLM.load(ns.folder, quantized=ns.quantized, threads=ns.threads)
        sys.stdout.write(ns.prompt)
        for piece in lm.generate(ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_k, ns.top_p, ns.greedy,
                                 ns.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (ValueError, FileNotFoundError) as err:
        print(f"attnfree-runtime: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
