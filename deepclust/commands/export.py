"""``deepclust export``: the trained backbone alone, in safetensors (default), torchvision or timm form."""

from __future__ import annotations

import argparse

from ..export import FORMATS, export_backbone


def run(args: argparse.Namespace) -> int:
    how = export_backbone(args.checkpoint, args.out, args.format)
    print(f"wrote {args.out} ({args.format}): the backbone alone, no method heads, memory banks or optimiser state."
          f"\nLoad it with:\n\n{how}\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the trained backbone alone (safetensors, torchvision or timm)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=FORMATS, default="safetensors")
