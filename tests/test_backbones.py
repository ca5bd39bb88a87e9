"""Backbones: every name builds, pooled features of feat_dim, L2-normalised embedding."""

from __future__ import annotations

import pytest
import torch

from deepclust.backbones import BACKBONES, Backbone, Sobel

FEAT_DIMS = {"resnet18_cifar": 512, "resnet18": 512, "resnet50": 2048, "vgg16_bn": 512, "alexnet_bn": 256,
             "convnet": 64}


def test_registry_is_complete():
    assert set(BACKBONES) == set(FEAT_DIMS)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_shapes_and_normalised_embedding(name):
    torch.manual_seed(0)
    model = Backbone(name, image_size=32, width=8).eval()
    batch = 2 if name in ("resnet50", "vgg16_bn") else 3
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        z = model(x)
    assert model.feat_dim == FEAT_DIMS[name]
    assert feats.shape == (batch, model.feat_dim)
    assert z.shape == (batch, 128)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed(feats), z)
    assert not torch.allclose(z[0], z[1])  # different inputs, different embeddings


def test_convnet_width_and_embed_dim():
    model = Backbone("convnet", image_size=32, embed_dim=16, width=4).eval()
    assert model.feat_dim == 32
    with torch.no_grad():
        z = model(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 16)


@pytest.mark.parametrize("name", ["convnet", "alexnet_bn", "resnet18_cifar"])
def test_sobel_input(name):
    model = Backbone(name, image_size=32, sobel=True, width=8).eval()
    assert isinstance(model.sobel, Sobel)
    with torch.no_grad():
        z = model(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    # the first layer takes the 2 Sobel channels
    first_conv = next(m for m in model.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 2


def test_sobel_filter_on_a_ramp():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8)  # grey value = column index
    out = Sobel()(ramp)
    assert out.shape == (1, 2, 8, 8)
    luma = 0.2989 + 0.587 + 0.114
    inner = out[0, :, 1:-1, 1:-1]
    torch.testing.assert_close(inner[0], torch.full((6, 6), -8.0 * luma), atol=1e-4, rtol=0)
    torch.testing.assert_close(inner[1], torch.zeros(6, 6), atol=1e-4, rtol=0)
    assert Sobel()(torch.full((1, 3, 6, 6), 0.7))[0, :, 1:-1, 1:-1].abs().max() < 1e-5


def test_sobel_is_not_a_trained_or_saved_parameter():
    model = Backbone("convnet", sobel=True, width=4)
    assert not any(name.startswith("sobel") for name, _ in model.named_parameters())
    assert not any(key.startswith("sobel") for key in model.state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_large_images_use_the_imagenet_stem(name):
    model = Backbone(name, image_size=64)
    assert model.trunk.conv1.kernel_size == (7, 7)
    assert isinstance(model.trunk.maxpool, torch.nn.MaxPool2d)
    small = Backbone(name, image_size=32)
    assert small.trunk.conv1.kernel_size == (3, 3)
    assert isinstance(small.trunk.maxpool, torch.nn.Identity)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'") as err:
        Backbone("resnet9000")
    for name in BACKBONES:
        assert name in str(err.value)


@pytest.mark.parametrize("name,sobel", [(n, False) for n in sorted(BACKBONES)] + [("convnet", True)])
def test_feature_pass_with_folded_conv_bn_matches_the_model(name, sobel):
    from deepclust.augment import test_transform
    from deepclust.eval.features import extract_features, inference_trunk

    torch.manual_seed(0)
    model = Backbone(name, 32, sobel=sobel, width=8)
    model.train()
    model.features(torch.randn(4, 3, 32, 32))  # BN running statistics away from their defaults
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert type(inference_trunk(model)).__name__ == "GraphModule"  # the fold really happened
    model.eval()
    with torch.no_grad():
        x = test_transform(images, 32)
        pooled, embedding = model.features(x), model(x)
    assert model.training is False
    model.train()
    got_pooled = extract_features(model, images, "pooled", normalize=False)
    got_embedding = extract_features(model, images, "embedding")
    assert model.training is True  # mode restored
    assert torch.allclose(got_pooled, pooled, rtol=1e-4, atol=1e-5 * float(pooled.abs().max()))
    assert torch.allclose(got_embedding, embedding, atol=1e-5)
