"""Tests for training/data.py: IDX parsing, checksums, errors, the tf.data pipeline, and tfds' order.

Most tests write small gzip'd IDX files of their own. Their SHA-256 digests
are put into `data.SHA256` for the test (monkeypatch), so the real checks
run on them; the "wrong checksum" case keeps the real constants.

tfds' order is checked against tfds' own `FashionMNIST` builder run on
local IDX files (`_FashionMnistFromLocalFiles`); the tests on the real files
at `data.DEFAULT_DATA_DIR` skip, saying why, only where those are absent.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import pytest

from training import data

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.image_classification import mnist as tfds_mnist  # noqa: E402

ORIGINAL_SHA256 = dict(data.SHA256)
REAL_DIR = Path(data.DEFAULT_DATA_DIR)
REAL_FILES_MISSING = [name for name in ORIGINAL_SHA256 if not (REAL_DIR / name).is_file()]
real_files = pytest.mark.skipif(
    bool(REAL_FILES_MISSING),
    reason=(
        f"the real Fashion-MNIST files are not installed ({', '.join(REAL_FILES_MISSING)} missing in {REAL_DIR}); "
        "`make test` installs them with `apt-get install dataset-fashion-mnist` where apt is available"
    ),
)
HOW_TO_GET = "apt-get install dataset-fashion-mnist"

N_TRAIN, N_TEST = 300, 120


# --------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + array.tobytes()


def _write_gz(path: Path, raw: bytes) -> str:
    path.write_bytes(gzip.compress(raw))
    return hashlib.sha256(raw).hexdigest()


def _reference_order(split: str, num_examples: int) -> list:
    """tfds' rule, re-derived with hashlib alone: ascending md5(split name + str(index))."""
    return sorted(range(num_examples), key=lambda i: int(hashlib.md5(f"{split}{i}".encode()).hexdigest(), 16))


def _example_ids(images) -> np.ndarray:
    """Recovers each example's IDX index from pixels (0, 0) and (0, 1), where `_make_split` wrote it."""
    pixels = np.asarray(images)
    if pixels.dtype != np.uint8:  # scaled to [0, 1]
        pixels = np.rint(pixels * 255).astype(np.int64)
    pixels = pixels.reshape(len(pixels), 28, 28).astype(np.int64)
    return pixels[:, 0, 0] + 256 * pixels[:, 0, 1]


def _make_split(rng: np.random.Generator, num_examples: int) -> Tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, (num_examples, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(num_examples) % 256
    images[:, 0, 1] = np.arange(num_examples) // 256
    labels = rng.integers(0, 10, num_examples).astype(np.uint8)
    return images, labels


@dataclasses.dataclass
class SmallData:
    folder: Path
    raw: Dict[str, Tuple[np.ndarray, np.ndarray]]  # split -> (images, labels) in IDX order

    def path(self, split: str, kind: str) -> Path:
        return self.folder / data.FILES[split][0 if kind == "images" else 1]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """The user's own data settings must not leak into the tests."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(data.TFDS_DIR_ENV, raising=False)


@pytest.fixture
def small_data(tmp_path, monkeypatch) -> SmallData:
    """Four small valid IDX .gz files (train 300, test 120), their digests registered in `data.SHA256`."""
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(7)
    raw = {}
    for split, count in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = _make_split(rng, count)
        image_name, label_name = data.FILES[split]
        monkeypatch.setitem(data.SHA256, image_name, _write_gz(folder / image_name, _idx_bytes(images)))
        monkeypatch.setitem(data.SHA256, label_name, _write_gz(folder / label_name, _idx_bytes(labels)))
        raw[split] = (images, labels)
    return SmallData(folder, raw)


class _LocalDownloads:
    """Stands in for tfds' DownloadManager: serves each URL's file from a local folder, decompressed.

    Only the download is replaced (tfds' real DownloadManager checks the .gz
    bytes against upstream's, which Debian's copies and our test files fail);
    example generation, the shuffle, the record files and reading them back
    are tfds' own.
    """

    def __init__(self, source: Path, extract_dir: Path):
        self.source, self.extract_dir = source, extract_dir

    def download_and_extract(self, urls: Dict[str, str]) -> Dict[str, str]:
        self.extract_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for key, url in urls.items():
            name = url.rsplit("/", 1)[-1]
            target = self.extract_dir / name[: -len(".gz")]
            target.write_bytes(gzip.decompress((self.source / name).read_bytes()))
            paths[key] = str(target)
        return paths


class _FashionMnistFromLocalFiles(tfds_mnist.FashionMNIST, skip_registration=True):
    """tfds' own `fashion_mnist` builder, fed local IDX files; writes what `tfds.load` would read."""

    name = "fashion_mnist"

    def __init__(self, *, idx_dir: Path, splits: Sequence[str] = data.SPLITS, **kwargs):
        self._idx_dir, self._splits = Path(idx_dir), tuple(splits)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        local = _LocalDownloads(self._idx_dir, Path(self.data_dir).parent / "local_extracted")
        generators = super()._split_generators(local)
        for generator in generators:
            # Upstream hard-codes 60,000 / 10,000; small test files carry their own count in the header.
            labels_path = generator.gen_kwargs["label_path"]
            with open(labels_path, "rb") as file:
                generator.gen_kwargs["num_examples"] = int.from_bytes(file.read(8)[4:], "big")
        return [generator for generator in generators if generator.name in self._splits]


def _prepare_tfds(idx_dir: Path, tfds_dir: Path, splits: Sequence[str] = data.SPLITS):
    builder = _FashionMnistFromLocalFiles(idx_dir=idx_dir, splits=splits, data_dir=str(tfds_dir))
    builder.download_and_prepare()
    return builder


def _tfds_arrays(builder, split: str) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
    return images[..., 0], labels


def _collect(dataset) -> Tuple[np.ndarray, np.ndarray, list]:
    images, labels, sizes = [], [], []
    for batch_images, batch_labels in dataset:
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
        sizes.append(len(batch_labels))
    return np.concatenate(images), np.concatenate(labels), sizes


# --------------------------------------------------------------- parsing and order


@pytest.mark.parametrize("split", data.SPLITS)
def test_load_arrays_parses_idx_into_tfds_order(small_data, split):
    images, labels = data.load_arrays(split, data_dir=str(small_data.folder))
    raw_images, raw_labels = small_data.raw[split]
    order = _reference_order(split, len(raw_labels))

    assert images.dtype == np.uint8 and images.shape == raw_images.shape
    assert labels.dtype == np.int64 and labels.shape == raw_labels.shape
    np.testing.assert_array_equal(images, raw_images[order])
    np.testing.assert_array_equal(labels, raw_labels[order].astype(np.int64))
    np.testing.assert_array_equal(data.tfds_example_order(split, len(raw_labels)), order)
    assert order != sorted(order), "the tfds order must really differ from the IDX order"


def test_splits_are_hashed_with_their_own_salt():
    np.testing.assert_array_equal(data.tfds_example_order("test", 50), _reference_order("test", 50))
    assert not np.array_equal(data.tfds_example_order("train", 50), data.tfds_example_order("test", 50))


def test_limit_keeps_the_first_examples_of_the_tfds_order(small_data):
    full_images, full_labels = data.load_arrays("train", data_dir=str(small_data.folder))
    images, labels = data.load_arrays("train", data_dir=str(small_data.folder), limit=7)
    np.testing.assert_array_equal(images, full_images[:7])
    np.testing.assert_array_equal(labels, full_labels[:7])
    _, all_labels = data.load_arrays("train", data_dir=str(small_data.folder), limit=10 * N_TRAIN)
    np.testing.assert_array_equal(all_labels, full_labels)


def test_returned_arrays_are_writable_copies(small_data):
    images, labels = data.load_arrays("test", data_dir=str(small_data.folder))
    expected = images.copy()
    images[:] = 0
    labels[:] = -1
    again_images, again_labels = data.load_arrays("test", data_dir=str(small_data.folder))
    np.testing.assert_array_equal(again_images, expected)
    assert again_labels.min() >= 0


def test_data_dir_argument_beats_env_which_beats_default(small_data, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(small_data.folder))
    assert data.source_description() == f"local IDX files at {small_data.folder} (sha256 verified)"
    _, labels = data.load_arrays("test")
    np.testing.assert_array_equal(labels, small_data.raw["test"][1][_reference_order("test", N_TEST)])
    # The argument wins over the environment: the empty folder is used, and its files are missing.
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz is missing"):
        data.load_arrays("test", data_dir=str(other))
    assert "tensorflow-datasets" in data.source_description(data_dir="tfds")


def test_default_folder_absent_means_tfds_download(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", str(tmp_path / "not-installed"))
    monkeypatch.setenv(data.TFDS_DIR_ENV, str(tmp_path / "tfds"))
    assert data.source_description() == (
        f"tensorflow-datasets 'fashion_mnist' (downloaded and prepared in {tmp_path / 'tfds'})"
    )


@pytest.mark.parametrize("via_env", [False, True])
def test_named_folder_that_does_not_exist_is_an_error_not_a_download(tmp_path, monkeypatch, via_env):
    missing = tmp_path / "nowhere"
    if via_env:
        monkeypatch.setenv(data.DATA_DIR_ENV, str(missing))
    with pytest.raises(data.DataError) as error:
        data.load_arrays("train", data_dir=None if via_env else str(missing))
    message = str(error.value)
    assert f"Fashion-MNIST folder {missing} " in message and "does not exist" in message
    origin = f"($KERASBN_DATA_DIR='{missing}')" if via_env else f"(data_dir='{missing}')"
    assert f"{missing} {origin} does not exist" in message
    assert HOW_TO_GET in message


# --------------------------------------------------------------- errors


def _delete(path: Path) -> None:
    path.unlink()


def _cut_gzip_in_half(path: Path) -> None:
    compressed = path.read_bytes()
    path.write_bytes(compressed[: len(compressed) // 2])


def _not_gzip(path: Path) -> None:
    path.write_bytes(b"<html><body>404 Not Found</body></html>")  # what a failed download often leaves


def _bad_crc(path: Path) -> None:
    compressed = bytearray(path.read_bytes())
    compressed[-8] ^= 0xFF  # the gzip trailer's CRC-32
    path.write_bytes(bytes(compressed))


def _truncated_idx(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # valid gzip, IDX content shorter than its header says


def _labels_header_on_images(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1]) + raw[4:]))


ERROR_CASES = {
    # case: (split, file kind, how to break it, what the message says)
    "missing": ("train", "labels", _delete, "is missing"),
    "truncated_gzip": ("train", "images", _cut_gzip_in_half, "is truncated"),
    "not_gzip": ("test", "labels", _not_gzip, "is corrupt: not a valid gzip file"),
    "bad_crc": ("test", "images", _bad_crc, "is corrupt: not a valid gzip file"),
    "truncated_idx": ("train", "images", _truncated_idx, "is truncated: its header promises shape (300, 28, 28)"),
    "bad_magic": ("test", "images", _labels_header_on_images, "is corrupt: IDX magic number 00000801 is not 00000803"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_broken_file_raises_data_error_naming_it(small_data, case):
    split, kind, break_file, says = ERROR_CASES[case]
    path = small_data.path(split, kind)
    break_file(path)
    with pytest.raises(data.DataError) as error:
        data.load_arrays(split, data_dir=str(small_data.folder))
    message = str(error.value)
    assert f"Fashion-MNIST file {path} {says}" in message
    assert HOW_TO_GET in message


def test_wrong_checksum_raises_data_error_naming_the_file(small_data, monkeypatch):
    path = small_data.path("test", "labels")
    monkeypatch.setitem(data.SHA256, path.name, ORIGINAL_SHA256[path.name])
    actual = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    with pytest.raises(data.DataError) as error:
        data.make_dataset("test", 32, training=False, data_dir=str(small_data.folder))
    message = str(error.value)
    assert f"Fashion-MNIST file {path} fails its checksum" in message
    assert f"is {actual}, expected {ORIGINAL_SHA256[path.name]}" in message
    assert HOW_TO_GET in message


def test_image_and_label_counts_must_agree(small_data, monkeypatch):
    path = small_data.path("test", "labels")
    monkeypatch.setitem(data.SHA256, path.name, _write_gz(path, _idx_bytes(small_data.raw["test"][1][:-1])))
    with pytest.raises(data.DataError, match=f"{N_TEST} images, {N_TEST - 1} labels"):
        data.load_arrays("test", data_dir=str(small_data.folder))


def test_label_outside_the_classes_is_corrupt(small_data, monkeypatch):
    path = small_data.path("test", "labels")
    labels = small_data.raw["test"][1].copy()
    labels[5] = 10
    monkeypatch.setitem(data.SHA256, path.name, _write_gz(path, _idx_bytes(labels)))
    with pytest.raises(data.DataError, match=f"{path} is corrupt: label 10 is not a class"):
        data.load_arrays("test", data_dir=str(small_data.folder))


def test_a_repaired_file_is_read_again(small_data):
    path = small_data.path("test", "labels")
    good = path.read_bytes()
    _not_gzip(path)
    with pytest.raises(data.DataError):
        data.load_arrays("test", data_dir=str(small_data.folder))
    path.write_bytes(good)
    _, labels = data.load_arrays("test", data_dir=str(small_data.folder))
    assert len(labels) == N_TEST


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "validation"}, "`split` must be one of ('train', 'test'). Received: split='validation'"),
        ({"limit": 0}, "`limit` must be a positive integer. Received: limit=0"),
        ({"limit": 2.5}, "`limit` must be a positive integer. Received: limit=2.5"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer. Received: batch_size=0"),
        ({"seed": "1"}, "`seed` must be an integer. Received: seed='1'"),
        ({"split": "test", "training": True}, "Received: split='test', training=True"),
    ],
)
def test_bad_arguments_are_named(small_data, kwargs, message):
    arguments = {"split": "train", "batch_size": 32, "training": False, "data_dir": str(small_data.folder), **kwargs}
    with pytest.raises(ValueError) as error:
        data.make_dataset(arguments.pop("split"), arguments.pop("batch_size"), **arguments)
    assert message in str(error.value)


# --------------------------------------------------------------- the tf.data pipeline


def test_eval_dataset_batches_scales_and_keeps_order(small_data):
    dataset = data.make_dataset("test", 32, training=False, data_dir=str(small_data.folder))
    assert dataset.element_spec[0].shape.as_list() == [None, 28, 28, 1]
    assert dataset.element_spec[0].dtype == tf.float32 and dataset.element_spec[1].dtype == tf.int64
    images, labels, sizes = _collect(dataset)
    expected_images, expected_labels = data.load_arrays("test", data_dir=str(small_data.folder))

    assert sizes == [32, 32, 32, 24]
    np.testing.assert_array_equal(images, expected_images[..., None].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(labels, expected_labels)
    assert images.min() == 0.0 and images.max() == 1.0
    # A second pass (from the cache) gives the same batches.
    again_images, again_labels, _ = _collect(dataset)
    np.testing.assert_array_equal(again_images, images)
    np.testing.assert_array_equal(again_labels, labels)


def test_drop_remainder_and_limit(small_data):
    dataset = data.make_dataset(
        "test", 32, training=False, data_dir=str(small_data.folder), limit=100, drop_remainder=True, cache=False
    )
    images, labels, sizes = _collect(dataset)
    assert sizes == [32, 32, 32]
    _, expected_labels = data.load_arrays("test", data_dir=str(small_data.folder))
    np.testing.assert_array_equal(labels, expected_labels[:96])


def test_training_shuffle_is_seeded_and_reshuffles_each_epoch(small_data):
    def epochs(seed: int, count: int = 2) -> list:
        dataset = data.make_dataset("train", 64, training=True, data_dir=str(small_data.folder), seed=seed)
        return [_collect(dataset) for _ in range(count)]

    first, second = epochs(seed=3), epochs(seed=3)
    other = epochs(seed=4, count=1)
    ids = [_example_ids(images) for images, _, _ in first]
    raw_images, raw_labels = small_data.raw["train"]

    for (images, labels, sizes), epoch_ids in zip(first, ids):
        assert sizes == [64, 64, 64, 64, 44]
        assert sorted(epoch_ids) == list(range(N_TRAIN))  # every example exactly once
        np.testing.assert_array_equal(labels, raw_labels[epoch_ids])  # images stay with their labels
        np.testing.assert_array_equal(images[..., 0], raw_images[epoch_ids] / np.float32(255))
    for (images, labels, _), (images_again, labels_again, _) in zip(first, second):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(ids[0], ids[1]), "each epoch must be reshuffled"
    assert not np.array_equal(ids[0], _example_ids(other[0][0])), "another seed must give another order"
    tfds_order = np.asarray(_reference_order("train", N_TRAIN))
    assert not np.array_equal(ids[0], tfds_order), "the training data must be shuffled"


# --------------------------------------------------------------- tfds: same examples, same order


def test_tfds_builder_gives_the_same_examples_in_the_same_order(small_data, tmp_path, monkeypatch):
    """tfds' own FashionMNIST builder, run on the same IDX files, stores exactly what load_arrays returns;
    and data.py's tfds source (`data_dir="tfds"`) reads it back without a download."""
    tfds_dir = tmp_path / "tfds"
    builder = _prepare_tfds(small_data.folder, tfds_dir)
    monkeypatch.setenv(data.TFDS_DIR_ENV, str(tfds_dir))
    for split in data.SPLITS:
        local_images, local_labels = data.load_arrays(split, data_dir=str(small_data.folder))
        builder_images, builder_labels = _tfds_arrays(builder, split)
        np.testing.assert_array_equal(builder_images, local_images)
        np.testing.assert_array_equal(builder_labels, local_labels)

        tfds_images, tfds_labels = data.load_arrays(split, data_dir="tfds")
        assert tfds_images.dtype == np.uint8 and tfds_labels.dtype == np.int64
        np.testing.assert_array_equal(tfds_images, local_images)
        np.testing.assert_array_equal(tfds_labels, local_labels)

    _, limited = data.load_arrays("train", data_dir="tfds", limit=9)
    np.testing.assert_array_equal(limited, data.load_arrays("train", data_dir=str(small_data.folder), limit=9)[1])
    from_tfds = _collect(data.make_dataset("train", 50, training=True, data_dir="tfds", seed=5))
    from_local = _collect(data.make_dataset("train", 50, training=True, data_dir=str(small_data.folder), seed=5))
    np.testing.assert_array_equal(from_tfds[0], from_local[0])
    np.testing.assert_array_equal(from_tfds[1], from_local[1])


def test_tfds_source_fails_fast_when_the_download_host_is_unreachable(tmp_path, monkeypatch):
    """tfds' downloader retries for minutes (3.5 on this machine); data.py says at once why, and what to do."""
    for name in data._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data, "_download_host", lambda: "fashion-mnist.invalid")  # RFC 6761: never resolves
    monkeypatch.setenv(data.TFDS_DIR_ENV, str(tmp_path / "tfds"))
    with pytest.raises(data.DataError) as error:
        data.load_arrays("test", data_dir="tfds")
    message = str(error.value)
    assert f"Fashion-MNIST is not prepared in {tmp_path / 'tfds'}" in message
    assert "fashion-mnist.invalid cannot be reached" in message
    assert HOW_TO_GET in message


# --------------------------------------------------------------- the real files


@real_files
def test_real_files_counts_classes_and_first_labels():
    assert data.source_description() == f"local IDX files at {REAL_DIR} (sha256 verified)"
    train_images, train_labels = data.load_arrays("train")
    test_images, test_labels = data.load_arrays("test")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), [1000] * 10)
    # The first labels of tfds.load("fashion_mnist") (checked below against tfds' own builder).
    np.testing.assert_array_equal(train_labels[:10], [2, 1, 8, 4, 1, 9, 2, 2, 0, 2])
    np.testing.assert_array_equal(test_labels[:10], [4, 4, 9, 7, 5, 1, 0, 5, 7, 4])
    assert len(data.CLASS_NAMES) == 10 and data.CLASS_NAMES[9] == "Ankle boot"


@real_files
def test_real_files_match_the_checksums_and_the_idx_order():
    for name, expected in ORIGINAL_SHA256.items():
        assert hashlib.sha256(gzip.decompress((REAL_DIR / name).read_bytes())).hexdigest() == expected, name
    raw = gzip.decompress((REAL_DIR / "train-labels-idx1-ubyte.gz").read_bytes())
    idx_labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    np.testing.assert_array_equal(idx_labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # upstream's first labels
    _, labels = data.load_arrays("train")
    np.testing.assert_array_equal(labels, idx_labels[_reference_order("train", 60000)])


@real_files
def test_real_file_with_one_changed_label_fails_the_checksum(tmp_path):
    images_name, labels_name = data.FILES["test"]
    shutil.copy(REAL_DIR / images_name, tmp_path / images_name)
    raw = bytearray(gzip.decompress((REAL_DIR / labels_name).read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # still a valid IDX file with valid labels
    (tmp_path / labels_name).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError) as error:
        data.load_arrays("test", data_dir=str(tmp_path))
    assert f"Fashion-MNIST file {tmp_path / labels_name} fails its checksum" in str(error.value)


@real_files
@pytest.mark.slow  # tfds encodes 10,000 PNGs: ~7 s on an idle 2-core machine
def test_real_test_split_equals_tfds_builder_output(tmp_path):
    builder = _prepare_tfds(REAL_DIR, tmp_path / "tfds", splits=("test",))
    builder_images, builder_labels = _tfds_arrays(builder, "test")
    images, labels = data.load_arrays("test")
    np.testing.assert_array_equal(builder_images, images)
    np.testing.assert_array_equal(builder_labels, labels)


@real_files
def test_real_eval_dataset():
    images, labels, sizes = _collect(data.make_dataset("test", 1000, training=False))
    expected_images, expected_labels = data.load_arrays("test")
    assert sizes == [1000] * 10
    np.testing.assert_allclose(images[:1000, ..., 0], expected_images[:1000] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(labels, expected_labels)
