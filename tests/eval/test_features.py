import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sela.eval.features import Extracted, extract

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyModel(nn.Module):
    """The SelaModel interface on a toy network: features (B, 6), two heads with K = 3 and 5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)  # behaves differently in train mode: extraction must use eval mode
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 5)])

    def features_by_layer(self, x, layer):
        x = self.conv(x).mean(dim=(2, 3))  # (B, 4)
        if layer == "conv":
            return x
        if layer == "fc":
            return self.bn(self.fc(x))
        raise ValueError(layer)

    def forward_features(self, x):
        assert not torch.is_grad_enabled()
        return self.features_by_layer(x, "fc")

    def forward_head(self, features):
        return [head(features) for head in self.heads]


class IndexedImages(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def _normalise(x):
    return x.float().div(255).sub(0.5)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyModel()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    return model, images


def test_tensor_input_matches_direct_forward(setup):
    model, images = setup
    model.train()
    out = extract(model, images, transform=_normalise, batch_size=10, progress=False)
    assert isinstance(out, Extracted)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(_normalise(images))
        logits = model.forward_head(feats)
    assert out.features.dtype == torch.float32 and out.features.shape == (37, 6)
    torch.testing.assert_close(out.features, feats)
    assert [t.shape for t in out.logits] == [(37, 3), (37, 5)]
    for got, want in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(got, want)


def test_shuffled_loader_places_rows_by_index(setup):
    model, images = setup
    ref = extract(model, images, transform=_normalise, batch_size=64, progress=False)
    loader = DataLoader(
        IndexedImages(images), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    out = extract(model, loader, transform=_normalise, progress=False)
    torch.testing.assert_close(out.features, ref.features)
    for got, want in zip(out.logits, ref.logits, strict=True):
        torch.testing.assert_close(got, want)


def test_layer_and_no_heads(setup):
    model, images = setup
    out = extract(model, images, transform=_normalise, layer="conv", heads=False, progress=False)
    assert out.features.shape == (37, 4) and out.logits == []
    with_heads = extract(model, images, transform=_normalise, layer="conv", progress=False)
    ref = extract(model, images, transform=_normalise, progress=False)
    torch.testing.assert_close(with_heads.features, out.features)
    for got, want in zip(with_heads.logits, ref.logits, strict=True):  # heads still see the final features
        torch.testing.assert_close(got, want)


def test_loader_missing_rows_raises(setup):
    model, images = setup
    loader = DataLoader(IndexedImages(images), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="drop_last=False"):
        extract(model, loader, transform=_normalise, progress=False)


def test_float_images_raise(setup):
    model, images = setup
    with pytest.raises(ValueError, match="uint8"):
        extract(model, images.float(), transform=_normalise, progress=False)


def test_plain_list_raises(setup):
    model, images = setup
    with pytest.raises(ValueError, match="DataLoader"):
        extract(model, [images], transform=_normalise, progress=False)
