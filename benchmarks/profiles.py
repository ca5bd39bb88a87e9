"""Benchmark profiles: fixed sets of config keys, so that numbers of different runs stay comparable.

Each profile has
  ``train``:   keys applied to every method (``deepclust.config.TrainConfig`` keys);
  ``methods``: per-method overrides, applied only to methods that exist in ``deepclust.methods.METHODS``
               and only for keys that method accepts (``benchmarks.run`` drops and reports the others).

Data paths that are relative (``../shared/...``) are resolved against the repository root, not the
working directory. Change a profile only on purpose: results of different profile versions do not compare.
"""

from __future__ import annotations

# METHODS.md's optimiser, shared by every profile ("one protocol for every method").
PROTOCOL = {
    "batch_size": 128,
    "lr": 0.03,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_decay_at": [0.6, 0.8],
    "lr_decay": 0.1,
    "embed_dim": 128,
    "knn_k": 200,
    "knn_tau": 0.1,
    "seed": 0,
    "rounds": 1,  # multi-round methods set theirs in "methods" (a method's own YAML may say otherwise)
    "progress": False,
}

CIFAR10_TRAIN = "../shared/datasets/cifar10/train"  # relative to the repository root
CIFAR10_TEST = "../shared/datasets/cifar10/test"

PROFILES: dict[str, dict] = {
    # Harness check: every method, a few minutes on 2 CPU cores. The numbers mean nothing.
    "smoke": {
        "train": {
            **PROTOCOL,
            "data": "digits",
            "test_data": None,  # digits:test
            "backbone": "convnet",
            "width": 16,
            "subset": None,
            "test_subset": None,
            "epochs": 2,
            "eval_every": 1,
            "device": "auto",
        },
        "methods": {
            "and": {"rounds": 2, "epochs": 1},
            # digits has 1,438 training images: keep clusters well below that.
            "deepcluster": {"k": 30},
            "odc": {"k": 30, "min_cluster": 5},
            "uic": {"k": 30},
            "pcp": {"min_clusters": 30},  # N_t: 1,438 -> 30
        },
    },
    # CPU comparison: 5,000 CIFAR-10 training images, a small ConvNet, 15 epochs per method.
    "cpu": {
        "train": {
            **PROTOCOL,
            "data": CIFAR10_TRAIN,
            "test_data": CIFAR10_TEST,
            "backbone": "convnet",
            "width": 32,
            "subset": 5000,
            "test_subset": 2000,
            "epochs": 15,
            "eval_every": 3,  # each kNN evaluation costs a feature pass over train and test
            "device": "cpu",
        },
        "methods": {
            "and": {"rounds": 3, "epochs": 5},  # 15 epochs in all, like the others
            "deepcluster": {"k": 100},  # ~50 images per cluster on 5,000 images
            "odc": {"k": 100, "min_cluster": 10},
            "uic": {"k": 100},
            # N_t: 5,000 -> 100 (the floor from epoch 7). The paper votes over 15 epochs that all lie at the
            # floor (epochs 85-99 of 200); here the last 4 before epoch 12, all at the floor (4 is the fewest
            # whose best score, 1 + 0.8 + ... + 0.8^4 = 3.36, can reach the pull-back threshold 3.0).
            "pcp": {"min_clusters": 100, "vote_start": 0.75, "vote_epochs": 4},
        },
    },
    # CPU profile in which learning should show (issue 10): twice the cpu profile's images, over three times
    # its epochs; about 10 minutes a seed for a 1-view method on 2 cores (IS, 2 views: about twice that).
    # Run it with --seeds 0,1,2 --jobs 2 (one thread each). Cluster counts are left to k = N / 50 (200).
    "medium": {
        "train": {
            **PROTOCOL,
            "data": CIFAR10_TRAIN,
            "test_data": CIFAR10_TEST,
            "backbone": "convnet",
            "width": 32,
            "subset": 10000,
            "test_subset": 2000,
            "epochs": 50,
            "eval_every": 10,
            "device": "cpu",
        },
        "methods": {
            "and": {"rounds": 2, "epochs": 25},  # NPID for 25 epochs, then one anchor round: 50 epochs in all
            # N_t: 10,000 -> 200 (the floor from epoch 22); the paper's 15 of 200 voting epochs scale to 4 of 50,
            # so that the votes from epoch 25 on all lie at the floor, as the paper's do.
            "pcp": {"vote_epochs": 4},
        },
    },
    # METHODS.md's CIFAR-10 recipe (CIFAR ResNet-18, full 50k, 200 epochs a round), for a GPU.
    "paper": {
        "train": {
            **PROTOCOL,
            "data": CIFAR10_TRAIN,
            "test_data": CIFAR10_TEST,
            "backbone": "resnet18_cifar",
            "subset": None,
            "test_subset": None,
            "epochs": 200,
            "eval_every": 10,
            "device": "auto",
        },
        "methods": {
            "and": {"rounds": 5},  # round 0 (NPID) + 4 AND rounds: the 86.3 target; 84.2 is one round
            "deepcluster": {"k": 1000},  # the PCP paper's CIFAR-10 rerun
            # No CIFAR-10 setting in the ODC / UIC papers: our choice, k as DeepCluster, ODC's own threshold.
            "odc": {"k": 1000, "min_cluster": 20},
            "uic": {"k": 1000},
        },
    },
}

# The medium protocol at twice the images (and so twice the steps): the third size of issue 24's scale trend
# (cpu 586 steps, medium 3,906, large 7,812). About 100 minutes a seed for the seven methods of that trend
# on 2 cores (--jobs 2 --threads 1); it resumes from its checkpoints.
PROFILES["large"] = {
    "train": {**PROFILES["medium"]["train"], "subset": 20000, "eval_every": 25},
    "methods": PROFILES["medium"]["methods"],
}

# Each method at its own paper's recipe (deepclust/configs/own/*.yaml) at the medium scale (issue 24): the
# medium data and epochs, the recipe's optimiser, schedule, input and cluster counts. Multi-round recipes keep
# the medium's 50 epochs in all (5 rounds of 10); UIC's fixed-label phase keeps its 6% (3 of 50 epochs).
# The clustering methods of issue 30 are scaled as in the cpu-own profile below, into 10,000 images and 50
# epochs (39 steps an epoch at batch 256): 3 warm-up epochs (the file's 5% rounded up), prototypes frozen for 2
# epochs (78 steps), DeepClusterV2's 17 images a cluster (600 clusters), SeLa's about 427 (23 clusters), with
# its labels renewed every epoch (50 updates; its paper makes 80).
OWN_RECIPE_MEDIUM = {
    "and": {"epochs": 10}, "pcp": {"epochs": 10, "vote_epochs": 4}, "uic": {"fft_epochs": 3},
    "swav": {"warmup_epochs": 3, "freeze_prototypes_steps": 78},
    "deepclusterv2": {"warmup_epochs": 3, "k": 600},
    "sela": {"k": 23, "label_every": 1},
}


def own_recipe(method: str, scale: dict) -> dict:
    """The keys of ``configs/own/METHOD.yaml`` that are the recipe (not the method, backbone or length)."""
    from deepclust.config import CONFIG_DIR, read_yaml

    recipe = read_yaml(CONFIG_DIR / "own" / f"{method}.yaml")
    return {**{k: v for k, v in recipe.items() if k not in ("method", "backbone", "epochs")}, **scale.get(method, {})}


PROFILES["medium-own"] = {
    "train": PROFILES["medium"]["train"],
    "methods": {m: own_recipe(m, OWN_RECIPE_MEDIUM)
                for m in ("deepcluster", "odc", "uic", "and", "pcp", "swav", "deepclusterv2", "sela")},
}

# The clustering methods of issue 30 at their own recipes (configs/own/{swav,deepclusterv2,sela}.yaml) at the
# cpu scale: the cpu data and 15 epochs, the recipe's optimiser and heads. What the recipes count in steps or
# epochs of a 50,000-image run is scaled to the same share of this one: 1 warm-up epoch (solo-learn's 10 of
# 1000 is 1%, our file's 10 of 200 is 5%: 0.75 of 15 rounds up to 1), prototypes frozen for solo-learn's 2
# epochs (39 steps at batch 256, not 391), and the images per cluster kept: DeepClusterV2's 3000 clusters for
# 50,000 images (17 a cluster) become 300, SeLa's 128 (about 427 a cluster, its ImageNet ratio) become 12.
# SeLa renews its labels every epoch (its paper makes 80 updates in a run; 15 epochs allow 15). SwAV keeps
# 3000 prototypes (they split each batch and queue equally, not the data).
OWN_RECIPE_CPU = {
    "swav": {"warmup_epochs": 1, "freeze_prototypes_steps": 39},
    "deepclusterv2": {"warmup_epochs": 1, "k": 300},
    "sela": {"k": 12, "label_every": 1},
}
PROFILES["cpu-own"] = {
    "train": PROFILES["cpu"]["train"],
    "methods": {m: own_recipe(m, OWN_RECIPE_CPU) for m in OWN_RECIPE_CPU},
}

# The ODC paper's Table 4 protocol at the medium scale: every method fine-tunes a trained network (pass
# --set init=runs/BASE/is/seed{seed}/checkpoint.pt) for 20 epochs on the medium data, the shared lr 0.03
# decayed x0.1 at 12 and 16; "is" on the same init is the control (more training, no clustering).
PROFILES["finetune"] = {
    "train": {**PROFILES["medium"]["train"], "epochs": 20, "eval_every": 5},
    "methods": {
        "and": {"rounds": 2, "epochs": 10},  # 10 epochs of NPID (its bank filled from the init), one anchor round
        "pcp": {"vote_epochs": 4},
    },
}

# Published CIFAR-10 ResNet-18 weighted-kNN top-1 (METHODS.md; random and supervised from the PCP
# paper's Table V). Only the paper profile is comparable with them.
PAPER_KNN_HEADER = "paper kNN (R18, 200 ep)"
PAPER_KNN: dict[str, str] = {
    "supervised": "93.1 (PCP's F-S)",
    "random": "32.1 (PCP)",
    "npid": "80.8",
    "is": "83.6",
    "and": "84.2 (1 round) / 86.3 (5 rounds)",
    "deepcluster": "80.6 (k=1000, PCP rerun)",
    "pcp": "84.7 (1 round) / 87.3 (5 rounds)",
}
