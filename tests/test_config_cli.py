"""Configuration layering and the `deepclust` command, called in-process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from deepclust.checkpoint import CheckpointError, backbone_from_checkpoint, load_checkpoint, save_checkpoint
from deepclust.cli import build_parser, main
from deepclust.config import ConfigError, TrainConfig, coerce, parse_overrides, resolve
from deepclust.data import load_data


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def numbers(text: str) -> dict[str, float]:
    """'key: 1.2345' lines of the plain eval output."""
    return {k: float(v) for k, v in re.findall(r"^(\w+): (-?[0-9.]+)$", text, flags=re.M)}


# --- config --------------------------------------------------------------------------------------


def test_resolve_layers_later_wins(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("lr: 0.1\ntau: 0.2\nbatch_size: 32\n")
    train, hp = resolve([yaml.safe_load(cfg_file.read_text()), {"backbone": "convnet"}, {"lr": "0.5"}])
    assert train.method == "npid"
    assert train.lr == 0.5  # key=value beats the file
    assert train.batch_size == 32  # the file beats the method YAML
    assert hp.tau == 0.2
    assert train.backbone == "convnet"  # a flag beats the method YAML (resnet18_cifar)
    assert train.epochs == 200 and hp.bank_momentum == 0.5  # the method YAML
    assert train.width == TrainConfig.width  # code default


def test_resolve_method_yaml_and_method_keys():
    train, hp = resolve([{"method": "supervised"}])
    assert train.method == "supervised"
    assert type(hp).__name__ == "Config"
    with pytest.raises(ConfigError, match="unknown config key 'tau' for method 'supervised'"):
        resolve([{"method": "supervised", "tau": "0.3"}])


def test_coerce_types():
    assert coerce("epochs", "3", int) == 3
    assert coerce("lr", "1e-2", float) == pytest.approx(0.01)
    assert coerce("sobel", "true", bool) is True
    assert coerce("subset", "null", int | None) is None
    assert coerce("max_size", "none", int | None) is None  # as pad.yaml writes "no cap"
    assert coerce("subset", "50", int | None) == 50
    assert coerce("lr_decay_at", "[0.5, 0.75]", list[float]) == [0.5, 0.75]
    assert coerce("lr_decay_at", 0.5, list[float]) == [0.5]
    assert coerce("data", "digits:test", str) == "digits:test"
    for key, value, kind in [("epochs", "abc", int), ("epochs", "1.5", int), ("sobel", "maybe", bool),
                             ("sobel", "1", bool), ("lr", "fast", float)]:
        with pytest.raises(ConfigError, match=key):
            coerce(key, value, kind)
    with pytest.raises(ConfigError, match="may not be empty"):
        coerce("epochs", "", int)


@pytest.mark.parametrize("key, value, kind", [("epochs", "true", int), ("lr", "yes", float),
                                             ("subset", "on", int | None)])
def test_booleans_are_not_numbers(key, value, kind):
    # YAML reads true/yes/on as a bool, and bool is an int subclass: epochs=true must not mean 1 epoch
    with pytest.raises(ConfigError, match=key):
        coerce(key, value, kind)


def test_optional_string_values_are_kept_verbatim():
    # A path is a path: YAML must not turn 'on' into True or '0123' into the octal number 83.
    train, _ = resolve([{"test_data": "on", "init": "0123"}])
    assert train.test_data == "on"
    assert train.init == "0123"


def test_parse_overrides():
    assert parse_overrides(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_read_config_file_errors(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "absent.yaml", "--out", tmp_path / "o")
    assert rc == 2 and "no config file" in err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "list.yaml", "--out", tmp_path / "o")
    assert rc == 2 and "mapping" in err
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "o")
    assert rc == 2 and "unknown config key 'epochz'" in err


# --- CLI argument errors -------------------------------------------------------------------------


def test_methods_lists_methods(capsys):
    rc, out, _ = run_cli(capsys, "methods")
    assert rc == 0
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"npid", "supervised", "random"} <= names


def test_every_command_line_option_has_help():
    """Every option and argument of every subcommand says what it does in --help."""
    def silent(parser: argparse.ArgumentParser, path: str) -> list[str]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += silent(child, f"{path} {name}")
            elif not action.help and action.dest != "help":
                found.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
        return found

    assert silent(build_parser(), "deepclust") == []


def test_unknown_method(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--method", "magic", "--out", tmp_path / "o")
    assert rc == 2
    assert "unknown method 'magic'" in err
    assert "npid" in err and "supervised" in err and "random" in err
    assert not (tmp_path / "o").exists()


def test_unknown_backbone(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--backbone", "resnet9000", "--out", tmp_path / "o")
    assert rc == 2
    assert "unknown backbone 'resnet9000'" in err
    assert "convnet" in err and "resnet18_cifar" in err


def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "o", "learning_rate=0.1")
    assert rc == 2
    assert "unknown config key 'learning_rate'" in err
    for key in ("lr", "batch_size", "tau", "bank_momentum", "epochs"):
        assert re.search(rf"\b{key}\b", err), key


@pytest.mark.parametrize("pair, message", [
    ("epochs=abc", "epochs='abc' is not a valid int"),
    ("lr=fast", "lr='fast' is not a valid float"),
    ("sobel=maybe", "sobel='maybe' is not a valid bool"),
    ("epochs=0", "epochs must be at least 1"),
    ("bad_images=ignore", "unknown bad_images 'ignore'"),
    ("eval_feature=logits", "unknown eval_feature 'logits'"),
    ("novalue", "expected key=value"),
])
def test_bad_values(tmp_path, capsys, pair, message):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "o", pair)
    assert rc == 2
    assert message in err


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path), "--bogus-flag"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "x", "--data", "digits", "extra=1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "x", "--data", "digits", "--protocol", "svm"])
    assert exit_info.value.code == 2
    assert "svm" in capsys.readouterr().err


def test_missing_data_exits_2(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "o",
                         "backbone=convnet")
    assert rc == 2 and "no folder" in err


def test_supervised_on_unlabelled_data_exits_2(tmp_path, capsys):
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((8, 8, 8), np.uint8))
    rc, _, err = run_cli(capsys, "train", "--method", "supervised", "--data", tmp_path / "unlabelled.npz",
                         "--backbone", "convnet", "--epochs", "1", "--out", tmp_path / "o", "width=4",
                         "progress=false")
    assert rc == 2
    assert "labelled" in err


# --- train / embed / eval on the shared tiny run -------------------------------------------------


def test_train_writes_checkpoint_metrics_config(trained_run):
    assert sorted(p.name for p in trained_run.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.jsonl"]
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["untrained"] and rows[0]["global_epoch"] == -1 and 0 <= rows[0]["knn_top1"] <= 100
    row = rows[1]
    for key in ("epoch", "loss", "lr", "time", "knn_top1"):
        assert key in row, key
    assert row["epoch"] == 0 and row["global_epoch"] == 0
    assert np.isfinite(row["loss"]) and row["loss"] > 0
    assert row["lr"] == pytest.approx(0.03)
    assert row["time"] > 0
    assert 0 <= row["knn_top1"] <= 100
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["method"] == "npid" and config["backbone"] == "convnet"
    assert config["width"] == 8 and config["subset"] == 200 and config["epochs"] == 1
    assert config["tau"] == 0.1 and config["out"] == str(trained_run)
    payload = load_checkpoint(trained_run / "checkpoint.pt")
    assert payload["method"] == "npid"
    assert payload["next_epoch"] == 1 and payload["num_samples"] == 200
    assert payload["backbone"] == {"name": "convnet", "image_size": 32, "embed_dim": 128, "sobel": False,
                                   "width": 8}
    assert payload["state"]["bank.features"].shape == (200, 128)
    assert payload["eval_feature"] == "embedding"
    model = backbone_from_checkpoint(payload)
    assert model.feat_dim == 64
    assert torch.equal(model.head.weight, payload["state"]["backbone.head.weight"])


def test_train_prints_summary(tmp_path, capsys, tiny_train_args):
    rc, out, _ = run_cli(capsys, "train", "--method", "random", "--out", tmp_path / "r", *tiny_train_args)
    assert rc == 0
    assert "done: random on digits" in out and "kNN top-1" in out
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["knn_top1"] <= 100  # random-init trains nothing, evaluates once
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["eval_feature"] == "pooled"


def test_train_prints_the_untrained_networks_knn_beside_its_own(tmp_path, capsys, tiny_train_args):
    # the baseline row is the same network before training: for a method read on pooled features it is
    # exactly what the random-init reference of the same seed scores
    rc, out, _ = run_cli(capsys, "train", "--method", "uic", "--out", tmp_path / "u", *tiny_train_args, "k=5")
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    baseline = rows[0]["knn_top1"]
    assert rows[0]["untrained"] and f"(the untrained network: {baseline:.2f}%)" in out
    run_cli(capsys, "train", "--method", "random", "--out", tmp_path / "r", *tiny_train_args)
    random_row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert random_row["knn_top1"] == baseline


def test_init_from_checkpoint(trained_checkpoint, tmp_path, capsys, tiny_train_args):
    # random-init never trains, so its checkpoint holds exactly the backbone it was initialised from
    rc, _, _ = run_cli(capsys, "train", "--method", "random", "--out", tmp_path / "r", "--init", trained_checkpoint,
                       *tiny_train_args)
    assert rc == 0
    init = load_checkpoint(trained_checkpoint)["state"]
    state = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]
    backbone_keys = [k for k in init if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(state[k], init[k]) for k in backbone_keys)


def test_embed_writes_features_indices_labels(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "emb" / "test.npz"
    rc, stdout, _ = run_cli(capsys, "embed", "--checkpoint", trained_checkpoint, "--data", "digits",
                            "--split", "test", "--out", out)
    assert rc == 0 and "359 x 128" in stdout
    with np.load(out) as npz:
        assert set(npz.files) == {"features", "indices", "labels"}
        feats, indices, labels = npz["features"], npz["indices"], npz["labels"]
    assert feats.shape == (359, 128) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(indices, np.arange(359))
    assert np.array_equal(labels, load_data("digits:test").labels.numpy())
    rc, _, _ = run_cli(capsys, "embed", "--checkpoint", trained_checkpoint, "--data", "digits", "--split", "test",
                       "--feature", "pooled", "--out", tmp_path / "pooled.npz")
    assert rc == 0
    with np.load(tmp_path / "pooled.npz") as npz:
        assert npz["features"].shape == (359, 64)


def test_embed_unlabelled_data_has_no_labels(trained_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "u.npz", images=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    rc, _, _ = run_cli(capsys, "embed", "--checkpoint", trained_checkpoint, "--data", tmp_path / "u.npz",
                       "--out", tmp_path / "u_emb.npz")
    assert rc == 0
    with np.load(tmp_path / "u_emb.npz") as npz:
        assert set(npz.files) == {"features", "indices"}
        assert npz["features"].shape == (5, 128)


def test_eval_knn_agrees_with_sklearn_on_embeddings(trained_checkpoint, tmp_path, capsys, sklearn_knn):
    for split in ("train", "test"):
        rc, _, _ = run_cli(capsys, "embed", "--checkpoint", trained_checkpoint, "--data", "digits", "--split", split,
                           "--out", tmp_path / f"{split}.npz")
        assert rc == 0
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits", "--json")
    assert rc == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["protocol"] == "knn" and result["method"] == "npid" and result["k"] == 200
    assert result["feature"] == "embedding"
    with np.load(tmp_path / "train.npz") as tr, np.load(tmp_path / "test.npz") as te:
        assert len(tr["labels"]) == 1438 and len(te["labels"]) == 359
        pred = sklearn_knn(tr["features"], tr["labels"], te["features"], k=200, tau=0.1)
        reference = 100.0 * float((pred == te["labels"]).mean())
    assert abs(result["knn_top1"] - reference) <= 0.5
    assert result["knn_top1"] > 20  # well above chance (10%) on digits even after one epoch


def test_eval_linear_and_cluster_print_numbers(trained_checkpoint, capsys):
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits",
                         "--protocol", "linear")
    assert rc == 0
    values = numbers(out)
    assert 20 < values["linear_top1"] <= 100
    assert "protocol: linear" in out
    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits",
                         "--protocol", "cluster")
    assert rc == 0
    values = numbers(out)
    assert 0 < values["nmi"] <= 1 and -1 <= values["ari"] <= 1 and 10 <= values["acc"] <= 100


def test_eval_cluster_on_train_and_test_clusters_both_sets_together(trained_checkpoint, capsys):
    from deepclust.eval import cluster_metrics, extract_features

    rc, out, _ = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", "digits",
                         "--protocol", "cluster", "--cluster-on", "train+test", "--json")
    assert rc == 0
    got = json.loads(out)
    assert got["cluster_on"] == "train+test"
    model = backbone_from_checkpoint(load_checkpoint(trained_checkpoint))
    train, test = load_data("digits", "train"), load_data("digits", "test")
    feats = torch.cat([extract_features(model, d.images, "embedding") for d in (train, test)])
    want = cluster_metrics(feats, torch.cat((train.labels, test.labels)))  # 1,438 + 359 images
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_eval_needs_labels(trained_checkpoint, tmp_path, capsys):
    np.savez(tmp_path / "u.npz", images=np.zeros((4, 32, 32), np.uint8))
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", tmp_path / "u.npz",
                         "--test-data", tmp_path / "u.npz")
    assert rc == 2 and "labelled" in err
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", trained_checkpoint, "--data", tmp_path / "u.npz")
    assert rc == 2 and "--test-data" in err


# --- checkpoints: wrong method / backbone / data, and files that are no checkpoint ---------------


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_resume_with_other_method_names_both(run_copy, capsys, tiny_train_args):
    before = (run_copy / "metrics.jsonl").read_text()
    rc, _, err = run_cli(capsys, "train", "--method", "supervised", "--out", run_copy, "--resume", *tiny_train_args)
    assert rc == 2
    assert "'npid'" in err and "'supervised'" in err
    assert (run_copy / "metrics.jsonl").read_text() == before  # nothing touched


def test_resume_with_other_backbone_names_both(run_copy, capsys, tiny_train_args):
    # the last --backbone wins in argparse
    rc, _, err = run_cli(capsys, "train", "--method", "npid", "--out", run_copy, "--resume", *tiny_train_args,
                         "--backbone", "alexnet_bn")
    assert rc == 2
    assert "'convnet'" in err and "'alexnet_bn'" in err


@pytest.mark.parametrize("mode, key", [("resume", "width=16"), ("init", "width=16"), ("resume", "sobel=true"),
                                       ("init", "embed_dim=64")])
def test_checkpoint_of_other_backbone_shape_exits_2(run_copy, tmp_path, capsys, tiny_train_args, mode, key):
    # same backbone name, different architecture: a clear CheckpointError (exit 2), not a state_dict traceback
    where = ["--out", run_copy, "--resume"] if mode == "resume" else \
        ["--out", tmp_path / "new", "--init", run_copy / "checkpoint.pt"]
    rc, _, err = run_cli(capsys, "train", "--method", "npid", *where, *tiny_train_args, key)
    assert rc == 2
    assert key.split("=")[0] in err


def test_resume_with_other_data_size(run_copy, capsys, tiny_train_args):
    # the last key=value wins
    rc, _, err = run_cli(capsys, "train", "--method", "npid", "--out", run_copy, "--resume", *tiny_train_args,
                         "subset=150")
    assert rc == 2
    assert "200" in err and "150" in err


def test_resume_without_checkpoint_starts_the_run(tmp_path, capsys, caplog, tiny_train_args):
    # a run killed before its first checkpoint, or never started: the same command with --resume starts it
    caplog.set_level(logging.INFO, logger="deepclust")
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "fresh", "--resume", *tiny_train_args)
    assert rc == 0, err
    assert "has no checkpoint yet" in caplog.text and "starting the run from the beginning" in caplog.text
    assert load_checkpoint(tmp_path / "fresh" / "checkpoint.pt")["next_epoch"] == 1


class MakeDirOnUnpickle:
    """Unpickling this object runs os.mkdir(path): proof that a file was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_payload_is_really_dangerous(tmp_path):
    # guards the next test: its payload would leave a trace if anything unpickled it
    pickle.loads(pickle.dumps({"x": MakeDirOnUnpickle(tmp_path / "proof")}))
    assert (tmp_path / "proof").is_dir()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickle", "torch_save", "random_bytes", "plain_dict", "empty"])
def test_non_checkpoint_files_exit_2_without_unpickling(tmp_path, capsys, kind):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "model.pt"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"format": "deepclust/1", "x": MakeDirOnUnpickle(marker)}))
    elif kind == "torch_save":
        torch.save({"format": "deepclust/1", "x": MakeDirOnUnpickle(marker)}, path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "plain_dict":
        torch.save({"state": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(b"")
    for argv in (["eval", "--checkpoint", path, "--data", "digits"],
                 ["embed", "--checkpoint", path, "--data", "digits", "--out", tmp_path / "e.npz"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2
        assert str(path) in err
        assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_checkpoint_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"method": "npid", "x": torch.arange(3)})
    assert not (tmp_path / "c.pt.tmp").exists()
    payload = load_checkpoint(path)
    assert payload["format"] == "deepclust/1" and torch.equal(payload["x"], torch.arange(3))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
