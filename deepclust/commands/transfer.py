"""``deepclust transfer detection|segmentation|multilabel``: fine-tune a trained backbone on Pascal VOC inside
torchvision's Faster R-CNN (FPN), FCN / DeepLabV3, or under a multi-label head (``deepclust.transfer``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import distributed
from ..backbone_files import BACKBONE_FILE_HELP
from ..config import ConfigError, parse_overrides, read_yaml
from ..transfer.config import MODELS, TASKS, TransferConfig, resolve_transfer

EPILOG = ("Any key of the run can be set as key=value, e.g. iterations=2000 lr=0.01 min_size=[480,800] "
          f"(keys: {', '.join(TransferConfig.__dataclass_fields__)}). The papers' schedules: configs/transfer/*.yaml. "
          "Several GPUs: torchrun --nproc_per_node=N -m deepclust transfer ... (the batch is split over them).")


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..transfer.run import transfer

    layers = [read_yaml(Path(args.config))] if args.config else []
    flags = {"task": args.task, "checkpoint": args.checkpoint, "backbone": args.backbone, "data": args.data,
             "test_data": args.test_data, "out": args.out, "model": args.model, "iterations": args.iterations,
             "device": args.device}
    layers += [{k: v for k, v in flags.items() if v is not None}, parse_overrides(overrides)]
    if args.config and layers[0].get("task", args.task) != args.task:
        raise ConfigError(f"{args.config} is a {layers[0]['task']} config; run deepclust transfer {layers[0]['task']}")
    cfg = resolve_transfer(layers)
    if distributed.launch_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    row = transfer(cfg, resume=args.resume, overwrite=args.overwrite)
    if distributed.launch_rank() != 0:
        return 0
    if row.get("stopped"):
        print(f"stopped after iteration {row['iteration']} (stop_after); continue with --resume")
        return 0
    metric = {"detection": "ap50", "segmentation": "miou", "multilabel": "map"}[cfg.task]
    extra = f", VOC07 11-point AP50 {row['ap50_voc07']:.2f}" if cfg.task == "detection" else ""
    print(f"done: {cfg.task} ({cfg.model}) from {cfg.checkpoint}, {cfg.out}/checkpoint.pt; test {metric} "
          f"{row[metric]:.2f}{extra} on {row['test_images']} images")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="fine-tune a backbone on VOC detection, segmentation or multi-label "
                       "classification; writes OUT/checkpoint.pt, metrics.jsonl, config.yaml", epilog=EPILOG)
    p.add_argument("task", choices=TASKS, help="detection: Faster R-CNN (FPN on a ResNet), VOC07 11-point and area "
                   "AP50; segmentation: FCN or DeepLabV3, mean IoU; multilabel: a linear head, mAP")
    p.add_argument("--checkpoint", required=True, help=BACKBONE_FILE_HELP)
    p.add_argument("--backbone", help="a plain backbone file's backbone where its keys do not say it (resnet18, "
                   "resnet50, ...)")
    p.add_argument("--data", help="the training split: voc2007:ROOT[:SPLIT] or voc2012:ROOT[:SPLIT] from a local "
                   "VOCdevkit (default split: trainval for 2007, train for 2012); multilabel also takes any "
                   "labelled data")
    p.add_argument("--test-data", help="the split scored at the end (default: voc2007 test, voc2012 val)")
    p.add_argument("--out", help="the run folder (default runs/transfer)")
    p.add_argument("--config", help="a YAML file of transfer keys, e.g. configs/transfer/voc07_detection_r50_fpn.yaml")
    choices = "; ".join(f"{task}: {' | '.join(models)}" for task, models in MODELS.items())
    p.add_argument("--model", help=f"the model ({choices}); default: the first")
    p.add_argument("--iterations", type=int, help="training iterations (the schedule's lr_steps are iterations too)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out where it stopped (none yet: start it); safe to repeat")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a run, moving the old run aside to OUT.1/")
