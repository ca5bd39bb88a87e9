"""Frozen-network ODC churn (issue 10): one epoch of ODC's memory update + relabel with no optimiser step, so every
label change comes from the augmentation / train-mode noise of the update features, not from learning."""
import argparse
import json

import torch

from deepclust.augment import Augment, test_transform
from deepclust.backbones import Backbone
from deepclust.checkpoint import backbone_from_checkpoint, load_checkpoint
from deepclust.data import load_train_test
from deepclust.eval import extract_features
from deepclust.eval.clustering import nmi
from deepclust.methods.base import Batch, EpochContext
from deepclust.methods.odc import ODC

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--data", default="../shared/datasets/cifar10/train")
p.add_argument("--subset", type=int, default=10000)
p.add_argument("--supervised", required=True, help="a supervised checkpoint of the same backbone (its trunk)")
p.add_argument("--out", required=True, help="JSON file of the results")
args = p.parse_args()
torch.set_num_threads(1)
data, _ = load_train_test(args.data, None, None, "fail", args.subset, None, None)
images, labels = data.images, data.labels

def backbone(which, seed=0):
    if which == "untrained":
        torch.manual_seed(seed)
        return Backbone("convnet", 32, 128, False, 32)
    return backbone_from_checkpoint(load_checkpoint(which))

out = []
# (network, k, update features, dropout, neck mode)
configs = [("untrained", 200, "augmented", 0.5, "train"), ("untrained", 200, "augmented", 0.0, "train"),
           ("untrained", 200, "clean", 0.0, "train"), ("untrained", 200, "clean", 0.0, "eval"),
           ("untrained", 10, "augmented", 0.0, "train"),
           ("supervised", 200, "augmented", 0.5, "train"), ("supervised", 200, "augmented", 0.0, "train"),
           ("supervised", 200, "clean", 0.0, "train")]
SUP = args.supervised
for which, k, mode, dropout, neck_mode in configs:
    torch.manual_seed(0)
    bb = backbone("untrained" if which == "untrained" else SUP)
    m = ODC(bb, len(images), ODC.Config(k=k, min_cluster=max(2, 10000 // k // 5), dropout=dropout))
    def extract(feature, normalize=True, m=m):
        return extract_features(m.backbone, images, feature, normalize=normalize)
    ctx = EpochContext(0, 0, 50, 1, 0, torch.Generator().manual_seed(0), torch.device("cpu"), extract, labels)
    m.before_epoch(ctx)
    aug, gen = Augment(32), torch.Generator().manual_seed(1)
    churn = []
    for _epoch in range(3):
        start = m.labels.clone()
        m.train()
        if neck_mode == "eval":
            m.eval()
        with torch.no_grad():
            for idx in torch.randperm(len(images), generator=gen).split(128):
                x = aug(images[idx], gen) if mode == "augmented" else test_transform(images[idx], 32)
                z = m.neck(m.backbone.features(x))
                m.after_step(Batch([x], idx), {"neck": z})
        churn.append(round(float((m.labels != start).float().mean()), 3))
    r = {"backbone": which, "k": k, "update": mode, "dropout": dropout, "neck": neck_mode,
         "label_change_per_epoch": churn, "nmi_labels_end": round(nmi(labels, m.labels), 3)}
    print(json.dumps(r), flush=True)
    out.append(r)
json.dump(out, open(args.out, "w"), indent=1)
