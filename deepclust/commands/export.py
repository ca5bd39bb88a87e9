"""``deepclust export``: the trained backbone alone, in safetensors (default), torchvision or timm form."""

from __future__ import annotations

import argparse

from ..export import FORMATS, export_backbone, export_format


def run(args: argparse.Namespace) -> int:
    fmt = export_format(args.out, args.format)  # a mismatch with the suffix: refused before anything is read
    how = export_backbone(args.checkpoint, args.out, fmt)
    print(f"wrote {args.out} ({fmt}): the backbone alone, no method heads, memory banks or optimiser state."
          f"\nLoad it with:\n\n{how}\n")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the trained backbone alone (safetensors, torchvision, timm, detectron2 "
                       "or mmdetection)")
    p.add_argument("--checkpoint", required=True, help="a deepclust training checkpoint")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="default: from the --out suffix (.pt, .pth: torchvision; .safetensors and others: "
                   "safetensors); a timm:NAME backbone: timm or safetensors, the same file under timm's names; "
                   "detectron2: a ResNet under Detectron2's names (stem.conv1, res2.0.conv1.norm, shortcut), a plain "
                   "pickle of numpy arrays (.pkl) as its convert-torchvision-to-d2 writes; mmdetection: torch.save of "
                   "{'state_dict': ...} under torchvision's names, as mmdetection's ResNet has them")
