"""``fff-moe match``: parameter-equal configs of dense, FFF, path-neuron, sigma-MoE and PKM blocks."""

from __future__ import annotations

import argparse
import json

from ..matching import KINDS, describe, match


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d-model", type=int, required=True, help="model width d")
    p.add_argument("--dense-ffn", type=int, required=True, help="hidden width of the dense block to match")
    p.add_argument(
        "--to", nargs="+", default=["fff", "sigma_moe", "pkm"], choices=KINDS, metavar="KIND",
        help=f"blocks to match (any of {', '.join(KINDS)}); the dense block is always listed first",
    )
    p.add_argument("--fff-depth", type=int, default=None,
                   help="FFF depth (default: leaves about as wide as --expert-size)")
    p.add_argument("--fff-trees", type=int, default=1,
                   help="trees K of the FFF forest (default 1); depth and leaf width are matched for K trees")
    p.add_argument("--expert-size", type=int, default=128,
                   help="sigma-MoE expert size G (and the FFF leaf width aimed at)")
    p.add_argument("--top-k", type=int, default=4, help="sigma-MoE experts per token K")
    p.add_argument("--pkm-heads", type=int, default=4, help="PKM heads")
    p.add_argument("--pkm-knn", type=int, default=32, help="PKM value slots read per head")
    p.add_argument("--activation", default="relu", help="activation of dense, FFF and sigma-MoE blocks")
    p.add_argument("--json", action="store_true", help="print JSON (configs as dicts) instead of a table")


def run(args: argparse.Namespace) -> int:
    kinds = ["dense"] + [k for k in args.to if k != "dense"]
    rows = match(args.d_model, args.dense_ffn, kinds, fff_depth=args.fff_depth, fff_trees=args.fff_trees,
                 expert_size=args.expert_size,
                 top_k=args.top_k, pkm_heads=args.pkm_heads, pkm_knn=args.pkm_knn, activation=args.activation)
    if args.json:
        print(json.dumps([dict(kind=r.kind, config=r.config.to_dict(), params=r.params,
                               params_per_token=r.params_per_token, rel_diff=r.rel_diff) for r in rows], indent=2))
        return 0
    header = f"{'block':<12} {'size':<36} {'params':>12} {'vs dense':>9} {'per token':>12} {'% used':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.kind:<12} {describe(r.config):<36} {r.params:>12,} {100 * r.rel_diff:>+8.2f}% "
              f"{r.params_per_token:>12,} {r.percent_used:>7.2f}%")
    return 0
