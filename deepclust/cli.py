"""The ``deepclust`` command: train, eval, embed, cluster, export, report, compare, prepare, transfer, methods."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .backbone_files import BACKBONE_FILE_HELP, add_backbone_file_flags, add_reading_flags, open_backbone
from .checkpoint import CheckpointError
from .cluster import ClusteringError
from .commands import browse as browse_command
from .commands import cluster as cluster_command
from .commands import compare as compare_command
from .commands import evaluate as evaluate_command
from .commands import export as export_command
from .commands import prepare as prepare_command
from .commands import report as report_command
from .commands import transfer as transfer_command
from .commands import voc_svm as voc_svm_command
from .config import ConfigError, read_yaml, resolve
from .data import DataError, load_data
from .eval import PROTOCOLS, extract_features
from .eval.lowshot import LOWSHOT_DRAWS, LOWSHOT_SHOTS
from .eval.protocols import PROBES
from .safety import RunError, RunInterrupted

log = logging.getLogger("deepclust")


def torchrun_argv(argv: list[str], nproc: int) -> list[str]:
    """This ``deepclust train`` command line under ``torchrun --standalone`` with ``nproc`` processes."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "deepclust", *rest]


def cmd_train(args: argparse.Namespace, overrides: list[str], argv: list[str]) -> int:
    from . import distributed
    from .config import parse_overrides
    from .train import resolve_device, train

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    layers = []
    if args.config:
        layers.append(read_yaml(Path(args.config)))
    flags = {k: v for k, v in {"method": args.method, "data": args.data, "test_data": args.test_data,
                               "backbone": args.backbone, "epochs": args.epochs, "out": args.out,
                               "init": args.init, "device": args.device, "labels": args.labels}.items()
             if v is not None}
    layers += [flags, parse_overrides(overrides)]
    cfg, hparams = resolve(layers)  # before torchrun starts: a bad config or device is one error, not one a rank
    if args.nproc and args.nproc > 1 and not distributed.launched():
        distributed.check_gpu_count(args.nproc, resolve_device(cfg.device))
        return subprocess.call(torchrun_argv(argv, args.nproc))
    if distributed.launch_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    try:
        row = train(cfg, hparams, resume=args.resume, overwrite=args.overwrite)
    finally:
        distributed.finish()
    if distributed.launch_rank() != 0:
        return 0
    knn, untrained = row.get("knn_top1"), row.get("knn_untrained")
    result = (f", kNN top-1 {knn:.2f}%" if knn is not None else " (no kNN: no labelled test data, or a stop "
                                                                 "before the last epoch)")
    if knn is not None and untrained is not None:
        result += f" (the untrained network: {untrained:.2f}%)"
    print(f"done: {cfg.method} on {cfg.data}, {cfg.out}/checkpoint.pt{result}")
    if args.report:
        print(f"wrote {report_command.write_report(Path(cfg.out))}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """voc-svm (multi-label) has its own command; the single-label protocols share ``commands/evaluate.py``."""
    if args.protocol == "voc-svm" and args.probe == "fast":  # with --probe sgd, evaluate's check names the fix
        return voc_svm_command.run(args)
    return evaluate_command.run(args)


def cmd_embed(args: argparse.Namespace) -> int:
    opened = open_backbone(args.checkpoint, args.backbone, args.image_size, args.feature)
    model = opened.model.to(args.device)
    data = load_data(args.data, args.split, opened.image_size, args.bad_images)
    feature = opened.eval_feature
    feats = extract_features(model, data.images, feature, device=torch.device(args.device))
    arrays = {"features": feats.cpu().numpy().astype(np.float32), "indices": np.arange(len(data), dtype=np.int64)}
    if data.labels is not None:
        arrays["labels"] = data.labels.numpy()
    if data.paths is not None:
        arrays["paths"] = np.array(data.paths)  # relative to --data, row for row; a str array, no pickle
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print(f"wrote {args.out}: {feats.shape[0]} x {feats.shape[1]} {feature} features")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS

    for name, cls in METHODS.items():
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepclust", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method; writes OUT/checkpoint.pt, metrics.jsonl, config.yaml",
                       epilog="Any config key can be set as key=value, e.g. k=100 lr=0.06.")
    t.add_argument("--method", help="the method to train (deepclust methods lists them; default: npid)")
    t.add_argument("--data", help="digits | DIR | FILE.npz | NAME:ROOT[:SPLIT] | CACHE (from deepclust prepare; "
                   "default: digits)")
    t.add_argument("--test-data", help="the images the kNN evaluates on, in --data's forms (default: --data's test "
                   "split where it has one, else none)")
    t.add_argument("--labels", help="a CSV of path,label (the cluster browser's labels.csv) labelling --data's "
                   "images, for --method supervised and the kNN; images it leaves out are left out")
    t.add_argument("--backbone", help="resnet18_cifar (default), resnet18, resnet50, vgg16_bn, alexnet_bn, convnet, "
                   "or timm:NAME, any timm model (pip install 'deepclust[timm]'; README: Any backbone through timm)")
    t.add_argument("--epochs", type=int, help="epochs a round (default: the method's config)")
    t.add_argument("--out", help="the run folder: checkpoint, metrics, config (default: runs/run)")
    t.add_argument("--config", help="a YAML file of config keys")
    t.add_argument("--init", help="start the backbone from this file: a deepclust checkpoint or export, or a "
                   "torchvision / timm state_dict (README: Start from a backbone you have)")
    t.add_argument("--device", help="auto (default: a GPU if there is one), cpu, cuda or cuda:N")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out where it stopped (none yet: start it); safe to repeat")
    t.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a run, moving the old run aside to OUT.1/ (never deleted)")
    t.add_argument("--report", action="store_true", help="write OUT/report.html at the end")
    t.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine (starts torchrun --standalone; one per GPU, or "
                        "a few on CPU); for several machines call torchrun yourself (README)")

    e = sub.add_parser("eval", help="evaluate a checkpoint or any backbone file")
    e.add_argument("--checkpoint", required=True, help=BACKBONE_FILE_HELP)
    add_backbone_file_flags(e)
    e.add_argument("--data", required=True, help="the training images of the protocols (kNN memory, probes), in "
                   "train's --data forms")
    e.add_argument("--test-data", help="the images scored (default: --data's test split)")
    e.add_argument("--labels", help="a CSV of path,label (the cluster browser's labels.csv) labelling --data's "
                   "images; the test classes are matched by name; on class folders prints labels_agreement")
    e.add_argument("--protocol", choices=(*PROTOCOLS, "voc-svm", "all"), default="knn",
                   help="all: every protocol the data allows, one JSON; voc-svm: ODC's VOC07 SVMs, one per class "
                   "with the cost cross-validated on --data, mAP on the test split (--data voc2007:ROOT)")
    e.add_argument("--k", type=int, default=200, help="knn: neighbours that vote (default 200, the papers')")
    e.add_argument("--tau", type=float, default=0.1, help="knn: temperature of the neighbours' weights exp(s / tau)")
    e.add_argument("--cluster-on", choices=("test", "train+test"), default="test",
                   help="images the cluster protocol clusters (train+test: the clustering papers' protocol)")
    e.add_argument("--layers", help="linear, voc-svm: also probe each stage, 'all' or names (e.g. layer1,layer4)")
    e.add_argument("--layer-dim", type=int, default=2048,
                   help="--layers: stage features are average-pooled to about this many dimensions")
    e.add_argument("--ways", type=int, default=5, help="fewshot: classes per episode (at most the test classes)")
    e.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="fewshot: support images per class")
    e.add_argument("--queries", type=int, default=15, help="fewshot: query images per class and episode")
    e.add_argument("--episodes", type=int, default=600, help="fewshot: episodes averaged")
    e.add_argument("--probe", choices=PROBES, default="fast",
                   help="linear: fast (L-BFGS on cached features) or sgd (the papers' SGD on augmented crops)")
    e.add_argument("--probe-epochs", type=int, default=32, help="--probe sgd: epochs (lr /10 at 10, 20, 30 of 32)")
    e.add_argument("--lowshot-shots", type=int, nargs="+", default=list(LOWSHOT_SHOTS),
                   help="lowshot: positives per class of the SVMs")
    e.add_argument("--lowshot-draws", type=int, default=LOWSHOT_DRAWS, help="lowshot: random draws per shot value")
    e.add_argument("--svm-cost", type=float, default=1.0, help="lowshot: the SVMs' cost C")
    e.add_argument("--seed", type=int, default=0, help="fewshot, lowshot, --probe sgd: seed of the random draws")
    add_reading_flags(e)
    e.add_argument("--json", action="store_true", help="print the results as one JSON object")

    m = sub.add_parser("embed", help="write features of a dataset to an .npz")
    m.add_argument("--checkpoint", required=True, help=BACKBONE_FILE_HELP)
    add_backbone_file_flags(m)
    m.add_argument("--data", required=True, help="the images, in train's --data forms")
    m.add_argument("--split", default="train", help="the split of a NAME:ROOT or digits source (default: train)")
    m.add_argument("--out", required=True, help="the .npz to write: features, indices, labels and paths where known")
    add_reading_flags(m)

    for command in (cluster_command, browse_command, export_command, report_command, compare_command, prepare_command,
                    transfer_command):
        command.add_parser(sub)
    sub.add_parser("methods", help="list the methods")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command not in ("train", "transfer") and rest:  # their key=value overrides
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    bad_flags = [r for r in rest if r.startswith("-")]
    if bad_flags:
        parser.error(f"unrecognised arguments: {' '.join(bad_flags)}")
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": lambda: cmd_train(args, rest, argv), "eval": lambda: eval_command(args),
                "embed": lambda: cmd_embed(args), "methods": lambda: cmd_methods(args),
                "cluster": lambda: cluster_command.run(args), "export": lambda: export_command.run(args),
                "report": lambda: report_command.run(args), "compare": lambda: compare_command.run(args),
                "prepare": lambda: prepare_command.run(args), "browse": lambda: browse_command.run(args),
                "transfer": lambda: transfer_command.run(args, rest)}
    try:
        return commands[args.command]()
    except RunInterrupted as err:  # SIGTERM / SIGINT: 128 + the signal, as a shell reports a killed job
        print(f"deepclust: {err}", file=sys.stderr)
        return err.exit_code
    except (ConfigError, DataError, CheckpointError, ClusteringError, RunError) as err:
        print(f"deepclust: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
