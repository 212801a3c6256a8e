"""Import of pickled TensorDataset .pt files through the restricted loader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cai_helpers.dataset import DatasetReader
from cai_helpers.errors import DataFormatError, UnsafePickleError
from cai_helpers.ptdata import import_pt_dataset, load_pt_tensors

torch.set_num_threads(1)


def _tensors(images_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = images_shape[0]
    return (torch.rand(images_shape, generator=generator), 14 + 6 * torch.rand(n, 5, generator=generator),
            0.4 * torch.rand(n, generator=generator))


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((6, 5, 32, 32), False), ((6, 64, 64, 5), True)],
)
def test_pt_round_trip(tmp_path, local_store, shape, channels_last):
    images, magnitudes, redshift = _tensors(shape)
    path = tmp_path / "part.pt"
    torch.save(TensorDataset(images, magnitudes, redshift), path)

    manifest = import_pt_dataset(path, local_store, "imported", seed=1, shard_rows=4)
    data = DatasetReader(local_store, "imported").read_all()
    expected = images.numpy().transpose(0, 3, 1, 2) if channels_last else images.numpy()
    assert manifest["n_rows"] == 6
    assert manifest["image_size"] == expected.shape[2]
    np.testing.assert_array_equal(data["images"], expected)
    np.testing.assert_array_equal(data["magnitudes"], magnitudes.numpy())
    np.testing.assert_array_equal(data["redshift"], redshift.numpy())
    np.testing.assert_array_equal(data["object_id"], np.arange(6))
    assert np.isnan(data["magnitude_errors"]).all()


def test_pt_plain_tuple_accepted(tmp_path):
    path = tmp_path / "tuple.pt"
    torch.save(_tensors((3, 5, 32, 32)), path)
    assert [t.shape for t in load_pt_tensors(path)] == [(3, 5, 32, 32), (3, 5), (3,)]


class _CreatesMarker:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_rejected(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = [_CreatesMarker(str(marker)), torch.zeros(2)]
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))

    with pytest.raises(UnsafePickleError, match="evil.pt") as info:
        load_pt_tensors(path)
    assert "weights_only=False" in str(info.value)
    assert not marker.exists()

    # The payload is live: an unrestricted load creates the marker.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_pt_wrong_content_rejected(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"images": torch.zeros(2, 5, 32, 32)}, path)
    with pytest.raises(DataFormatError, match="contains a dict"):
        load_pt_tensors(path)
    odd = tmp_path / "odd.pt"
    torch.save(TensorDataset(torch.zeros(2, 4, 32, 32), torch.zeros(2, 5), torch.zeros(2)), odd)
    with pytest.raises(DataFormatError, match="images have shape"):
        import_pt_dataset(odd, None, "unused")


def test_refusal_does_not_advise_allow_listing(tmp_path):
    """torch's message suggests add_safe_globals; ours must not pass that advice on."""
    import datetime

    import torch

    # An importable, harmless class outside the allow-list: torch's refusal names it
    # and suggests allow-listing it.
    torch.save({"x": datetime.date(2020, 1, 1)}, tmp_path / "odd.pt")
    with pytest.raises(UnsafePickleError) as info:
        load_pt_tensors(tmp_path / "odd.pt")
    assert "add_safe_globals" not in str(info.value)
    assert "odd.pt" in str(info.value)
