"""``make demo``: the ``demo`` recipe's comparison of fastformer, fastformer-conv, Leviathan and GPT-2 on Tiny
Shakespeare, written to ``runs/demo/`` (results.md, results.json, plots), with the table printed at the end.

Usage: ``python -m attnfree.demo [--output-dir DIR] [--max-steps N] [--models a,b,c]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnfree.compare import compare
from attnfree.models.registry import split_model_list
from attnfree.training import recipe

DEMO_MODELS = "fastformer,fastformer-conv,leviathan,gpt2"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnfree.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/demo", help="where results go (default: runs/demo)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per model (default: recipe's)")
    parser.add_argument("--models", default=DEMO_MODELS, help=f"model specs (default: {DEMO_MODELS})")
    ns = parser.parse_args(argv)
    try:
        result = compare(recipe("demo", output_dir=ns.output_dir), split_model_list(ns.models), ns.output_dir,
                         max_steps=ns.max_steps)
    except (ValueError, FileNotFoundError) as err:
        print(f"attnfree: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print()
    print(result.table)
    print(f"\ncomparison wall time: {result.wall_seconds:.1f} s; details in {result.output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
