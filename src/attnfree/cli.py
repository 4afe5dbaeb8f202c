"""``attnfree train|eval|generate|compare|recall|serve|export``: thin argparse wrappers over the Python API.

Every ``TrainSettings`` field is a ``train`` flag (``hidden_size`` -> ``--hidden-size``), generated from the
dataclass so the two never drift apart. The same ``train`` command runs on several processes unchanged:
``torchrun --nproc_per_node 2 -m attnfree.cli train ...`` or ``accelerate launch --multi_gpu --num_processes 2
-m attnfree.cli train ...`` (gloo on CPU; accelerate's ``--cpu`` with several processes needs mpirun instead).
Bad input (ValueError, FileNotFoundError) prints ``attnfree: error: <one line>`` and exits with status 2,
without a traceback. Every ``ServeSettings`` field is a ``serve`` flag the same way. A command builds only its own
parser and imports what it needs when it runs: ``attnfree serve EXPORT_DIR`` never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnfree.training import TrainSettings

# ----------------------------------------------------------------------------------------------
# TrainSettings <-> flags
# ----------------------------------------------------------------------------------------------


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _resume(text: str) -> bool | str:
    lowered = text.strip().lower()
    return {"true": True, "false": False}.get(lowered, text)


# annotation (as written in TrainSettings) -> argparse keyword arguments
_FLAG_KINDS: dict[str, dict[str, Any]] = {
    "str": {"type": str},
    "int": {"type": int},
    "float": {"type": float},
    "bool": {"action": argparse.BooleanOptionalAction},
    "int | None": {"type": _optional(int)},
    "float | None": {"type": _optional(float)},
    "str | None": {"type": _optional(str)},
    "tuple[float, float]": {"type": float, "nargs": 2, "metavar": ("BETA1", "BETA2")},
    "list[str]": {"type": lambda text: [t for t in text.split(",") if t]},
    "bool | str": {"type": _resume, "nargs": "?", "const": True, "metavar": "CHECKPOINT"},
}

# dict fields take repeatable KEY=VALUE flags under their own names
_DICT_FLAGS = {"model_overrides": "--model-override", "extra_training_args": "--training-arg"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainSettings`` field; defaults are SUPPRESSed so only given flags override."""
    from attnfree.training import TrainSettings

    add_dataclass_flags(parser.add_argument_group("training settings (override the recipe / --config)"),
                        TrainSettings)


def add_dataclass_flags(group: Any, settings: type) -> None:
    """One flag per field of the dataclass ``settings`` (its help from the field's metadata); defaults are
    SUPPRESSed so only given flags appear in the namespace."""
    for f in dataclasses.fields(settings):
        shown = f.default if f.default is not dataclasses.MISSING else "{}" if "dict" in str(f.type) else "[]"
        help_text = f"{f.metadata['help']} (default: {shown})"
        if f.name in _DICT_FLAGS:
            group.add_argument(_DICT_FLAGS[f.name], dest=f.name, action="append", metavar="KEY=VALUE",
                               default=argparse.SUPPRESS, help=help_text + "; repeatable")
            continue
        kind = _FLAG_KINDS[str(f.type)]
        group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, help=help_text, **kind)


def settings_from_args(ns: argparse.Namespace) -> TrainSettings:
    """Recipe (or defaults), then ``--config`` file, then the flags given."""
    from attnfree.models.registry import parse_assignments
    from attnfree.training import RECIPES, TrainSettings

    if ns.recipe is not None and ns.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {ns.recipe!r}; valid: {', '.join(RECIPES)}")
    base = RECIPES[ns.recipe] if ns.recipe else TrainSettings()
    if ns.config:
        base = base.replace(**_config_file(ns.config))
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(ns, f.name)}
    for name, flag in _DICT_FLAGS.items():
        if name in given:
            given[name] = {**getattr(base, name), **parse_assignments(given[name], what=flag)}
    return base.replace(**given)


def _config_file(path: str) -> dict[str, Any]:
    """Settings from a JSON file: a ``TrainSettings`` dict, or a ``run.json`` (its ``settings``)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} not found")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    values = values.get("settings", values) if isinstance(values, dict) else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {file} must hold a JSON object")
    from attnfree.training import TrainSettings

    return TrainSettings.from_dict(values).to_dict()


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def cmd_train(ns: argparse.Namespace) -> int:
    from attnfree.training import train

    settings = settings_from_args(ns)
    result = train(settings)
    if ns.json and _is_main_process():
        print(json.dumps(dataclasses.asdict(result), indent=2))
    if _end_distributed():  # on success only: a failed rank exits at once and the launcher stops the others
        # Skip interpreter finalisation on launched workers: a c10d background thread destroyed there now and
        # then aborts the process ("terminate called without an active exception", exit -6) after a
        # successful run. Everything is saved and flushed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _end_distributed() -> bool:
    """Tear down the process group torchrun / accelerate launch made; True if there was one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()  # no rank tears down while another still talks to it (gloo aborts otherwise)
    dist.destroy_process_group()
    return True


def cmd_eval(ns: argparse.Namespace) -> int:
    from attnfree.evaluation.bpc import evaluate_checkpoint

    if ns.context:
        return _eval_contexts(ns)
    result = evaluate_checkpoint(ns.checkpoint, ns.data, data_dir=ns.data_dir, block_size=ns.block_size,
                                 stride=ns.stride, batch_size=ns.batch_size, bos=ns.bos)
    if ns.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    print(f"bpc:           {result.bpc:.4f}")
    print(f"nats/char:     {result.nats_per_char:.4f}")
    print(f"loss/token:    {result.loss_per_token:.4f}")
    print(f"perplexity:    {result.perplexity:.3f}")
    print(f"protocol:      {result.protocol}")
    return 0


def _eval_contexts(ns: argparse.Namespace) -> int:
    """``attnfree eval CKPT --context L1,L2,...``: BPC at each context length (sliding windows)."""
    from attnfree.evaluation.bpc import checkpoint_split, evaluate_contexts

    model, tokenizer, tokens, n_chars = checkpoint_split(ns.checkpoint, ns.data, ns.data_dir)
    rows = evaluate_contexts(model, tokens, n_chars, ns.context, ns.stride_fraction,
                             tokenizer.bos_token_id if ns.bos else None)
    if ns.json:
        print(json.dumps([{"context": r.context, "stride": r.stride, "note": r.note,
                           "result": dataclasses.asdict(r.result) if r.result else None} for r in rows], indent=2))
        return 0
    print(f"{'context':>8} {'stride':>8} {'bpc':>8}")
    for r in rows:
        print(f"{r.context:>8} {r.stride:>8} " + (f"{r.result.bpc:>8.4f}" if r.result else f"{'-':>8}  ({r.note})"))
    return 0


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_generate(ns: argparse.Namespace) -> int:
    from attnfree.checkpoints import load_checkpoint
    from attnfree.inference.decoding import generate_text

    model, tokenizer = load_checkpoint(ns.checkpoint)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if ns.stream:
        write(ns.prompt)
    text = generate_text(model, tokenizer, ns.prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                         top_k=ns.top_k, top_p=ns.top_p, greedy=ns.greedy, seed=ns.seed,
                         on_text=write if ns.stream else None)
    print("" if ns.stream else ns.prompt + text)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from attnfree.compare import compare
    from attnfree.models.registry import split_model_list

    settings = settings_from_args(ns)
    models = split_model_list(ns.models)
    result = compare(settings, models, output_dir=settings.output_dir, prompt=ns.prompt,
                     sample_tokens=ns.sample_tokens, seeds=ns.seeds, baseline=ns.baseline or None, jobs=ns.jobs,
                     budget_seconds=ns.budget_seconds)
    print(result.table)
    print(f"\nwrote {result.output_dir / 'results.md'}")
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    from attnfree.training import RECIPES

    parser.add_argument("--recipe", default=None, help=f"start from a named recipe: {', '.join(RECIPES)}")
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="start from settings in a JSON file (a TrainSettings dict or a run.json)")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train one model", description="Train one model through transformers.Trainer; "
                       "writes checkpoints, the model, its tokenizer and run.json into --output-dir.")
    _add_recipe_flags(p)
    p.add_argument("--json", action="store_true", help="print the run result as JSON at the end")
    add_settings_flags(p)
    p.set_defaults(func=cmd_train)


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="bits per character of a checkpoint", description="Score a checkpoint on the "
                       "whole validation split: BPC, nats/char, loss/token, perplexity.")
    p.add_argument("checkpoint", help="a run folder or one of its checkpoint-N folders")
    p.add_argument("--data", required=True, help="corpus spec (as for train)")
    p.add_argument("--data-dir", default=None, help="the data bundle folder")
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the run's block size)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: block size, non-overlapping)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (default: 16)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="prepend BOS so the first token is scored (default: on)")
    p.add_argument("--context", type=_positive_ints, default=None, metavar="L1,L2,...",
                   help="BPC at each context length: sliding windows of L tokens (beyond the training block for "
                   "position-free models; lengths past a model's learned positions are skipped)")
    p.add_argument("--stride-fraction", type=float, default=0.5,
                   help="with --context: window stride as a fraction of L (default: 0.5)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def _generate_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="Continue a prompt, streaming tokens to the terminal as they are produced.")
    p.add_argument("checkpoint", help="a run folder or one of its checkpoint-N folders")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they come (default: on)")
    p.set_defaults(func=cmd_generate)


def _compare_parser(sub: Any) -> None:
    from attnfree.models.registry import MODELS

    p = sub.add_parser("compare", help="train several models alike and tabulate them",
                       description="Train each model on the same data, tokenizer, seed and budget (each in its own "
                       "process), then write results.md, results.json and BPC plots into --output-dir.")
    _add_recipe_flags(p)
    p.add_argument("--models", default="fastformer,fastformer-conv,leviathan,gpt2",
                   help=f"comma-separated model specs (registered: {', '.join(sorted(MODELS))}); "
                   "overrides ride along: 'fastformer:residual=normed,kernel_size=8,gpt2'")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                   help="train every model under each of these seeds and report mean ± std and the paired "
                   "difference to the baseline (default: --seed alone)")
    p.add_argument("--baseline", default="gpt2", help="the model spec the others are compared with, if listed "
                   "(default: gpt2; '' for none)")
    p.add_argument("--prompt", default="ROMEO:", help="prompt of the generated samples (default: 'ROMEO:')")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens per generated sample (default: 200)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each unless --threads is given; "
                   "their output goes to OUTPUT_DIR/logs (default: 1)")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help="equal time instead of equal steps: a round-robin probe of every model's step time sets "
                   "its max_steps to what fits S seconds of training, with the whole learning-rate schedule "
                   "(default: off; the plan is kept in OUTPUT_DIR/budget-plan.json)")
    add_settings_flags(p)
    p.set_defaults(func=cmd_compare)


def cmd_recall(ns: argparse.Namespace) -> int:
    from attnfree.evaluation.recall import collect, recall, results_table, settings_for
    from attnfree.models.registry import split_model_list

    if ns.collect:  # no training: the given sweeps' runs, one table and plot
        if not ns.output_dir:
            raise SystemExit("attnfree recall --collect needs --output-dir for the combined table and plot")
        print(results_table(collect(ns.collect.split(","), ns.output_dir)))
        print(f"\nwrote {Path(ns.output_dir) / 'results.md'}")
        return 0

    overrides = {k: v for k, v in (("seq_len", ns.seq_len), ("n_pairs", ns.n_pairs), ("vocab_size", ns.vocab_size),
                                   ("steps", ns.steps), ("lr", ns.lr), ("layers", ns.layers), ("seed", ns.seed))
                 if v is not None}
    settings = settings_for(ns.preset, **overrides)
    if ns.widths:
        settings = list({(s.task, w): dataclasses.replace(s, width=w) for s in settings for w in ns.widths}.values())
    results = recall(split_model_list(ns.models), settings, ns.output_dir,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
    print(results_table(results))
    if ns.output_dir:
        print(f"\nwrote {Path(ns.output_dir) / 'results.md'}")
    return 0


def _recall_parser(sub: Any) -> None:
    p = sub.add_parser("recall", help="multi-query associative recall (MQAR) for several models",
                       description="Train each model on the Zoology study's multi-query associative recall task and "
                       "report answer accuracy on held-out sequences beside each model's decode-state bytes.")
    p.add_argument("--models", default="fastformer,fastformer-conv,leviathan,gpt2,rwkv",
                   help="comma-separated model specs (as for compare)")
    p.add_argument("--preset", default="cpu", help="cpu (minutes per model) or zoology (the paper's settings)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T (override the preset's)")
    p.add_argument("--n-pairs", type=int, default=None, help="key-value pairs per sequence")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary (keys: first half, values: second)")
    p.add_argument("--widths", type=_positive_ints, default=None, metavar="W1,W2", help="model widths")
    p.add_argument("--layers", type=int, default=None, help="layers per model (default: 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="seed for the data and the weights")
    p.add_argument("--output-dir", default=None, help="write results.json, results.md and a plot here")
    p.add_argument("--collect", default=None, metavar="DIR1,DIR2",
                   help="train nothing: put the runs of earlier sweeps' output folders in one table and plot, with "
                   "the frontier of accuracy against state bytes (needs --output-dir)")
    p.set_defaults(func=cmd_recall)


def _serve_parser(sub: Any) -> None:
    from attnfree.inference.serve.settings import ServeSettings

    p = sub.add_parser("serve", help="serve a checkpoint or an ONNX export over HTTP (streaming, OpenAI-style, a page)",
                       description="Start an HTTP server: GET / (a page to try the model), POST /generate (server-sent "
                       "events), POST /v1/completions and /v1/chat/completions (OpenAI's API, strict), GET /v1/models, "
                       "/info, /stats, /health. Many streams share one process with continuous batching, each holding "
                       "only its constant-size state; prompts sharing a prefix reuse its state. An export folder "
                       "(attnfree export) is served by onnxruntime, without torch.")
    p.add_argument("target", metavar="FOLDER", help="a run folder, one of its checkpoint-N folders, or an export "
                   "folder (it holds manifest.json)")
    add_dataclass_flags(p.add_argument_group("server settings"), ServeSettings)
    p.set_defaults(func=cmd_serve)


def cmd_serve(ns: argparse.Namespace) -> int:
    from attnfree.inference.serve.app import serve
    from attnfree.inference.serve.settings import ServeSettings

    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(ServeSettings) if hasattr(ns, f.name)}
    serve(ns.target, ServeSettings(**given))
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from attnfree.inference.export import export_checkpoint

    result = export_checkpoint(ns.checkpoint, ns.output, format=ns.format, quantize=ns.quantize, opset=ns.opset)
    for name, record in result.manifest["files"].items():
        print(f"{record['bytes']:>12,d}  {result.folder / name}")
    print(f"wrote {result.folder / 'manifest.json'}")
    return 0


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a checkpoint for inference without torch",
                       description="Write the one-token recurrent step and the parallel prefill as ONNX graphs, the "
                       "tokenizer, a torch-free runner (runtime.py) and manifest.json into --output.")
    p.add_argument("checkpoint", help="a run folder or one of its checkpoint-N folders")
    p.add_argument("--format", default="onnx", help="export format (only 'onnx' for now)")
    p.add_argument("--output", required=True, help="the export folder to write")
    p.add_argument("--quantize", default=None, help="also write int8 dynamically quantized graphs: 'int8'")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.set_defaults(func=cmd_export)


PARSERS: dict[str, Callable[[Any], None]] = {
    "train": _train_parser, "eval": _eval_parser, "generate": _generate_parser, "compare": _compare_parser,
    "recall": _recall_parser, "serve": _serve_parser, "export": _export_parser}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone (which imports only what that command needs)."""
    parser = argparse.ArgumentParser(prog="attnfree", description="Attention-free causal language models: "
                                     "train, evaluate, sample and compare.")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers model families; repeatable); the processes that "
                        "compare starts import it too (through $ATTNFREE_IMPORT, which names more, comma-separated)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add in PARSERS.items():
        if command in (None, name):
            add(sub)
    return parser


def _import_families(modules: list[str]) -> None:
    """``--import``: import the modules now and name them in ``$ATTNFREE_IMPORT`` for the processes we start."""
    if not modules:
        return
    from attnfree.models.registry import IMPORT_ENV, import_models

    import_models(modules)
    named = [m for m in os.environ.get(IMPORT_ENV, "").split(",") if m]
    os.environ[IMPORT_ENV] = ",".join(dict.fromkeys([*named, *modules]))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnfree`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in PARSERS else None
    ns = build_parser(command).parse_args(args)
    if ns.command != "serve":  # (serving an export must not import transformers, which imports torch)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars; training progress uses tqdm directly
    try:
        _import_families(ns.imports)
        return int(ns.func(ns))
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"attnfree: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
