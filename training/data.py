"""Fashion-MNIST as a `tf.data` pipeline, offline first.

Two sources give the same examples in the same order:

* **Local IDX files**, the four original `*-ubyte.gz` files (Debian's package
  `dataset-fashion-mnist` installs them at /usr/share/datasets/fashion-mnist).
  They are decompressed and parsed with NumPy, and their decompressed content
  is checked against the SHA-256 constants in `SHA256`. Debian's `.gz` bytes
  differ from upstream's, so tfds' own checksum of the `.gz` would fail; the
  decompressed bytes are upstream's.
* **tensorflow-datasets** `fashion_mnist` (tfds downloads and prepares it), when
  no local folder is configured and the default one does not exist.

Which source: the `data_dir` argument, else the environment variable
`KERASBN_DATA_DIR`, else `DEFAULT_DATA_DIR`. The value `"tfds"` asks for the
tfds download explicitly. A folder that is named explicitly but does not
exist, and a folder whose files are missing, truncated or corrupt, raise
`DataError`; there is never a silent fallback to other data.

Order: tfds' builder stores the examples sorted by the md5 of their key (the
example's index in the IDX file) salted with the split name, and `tfds.load`
reads them back in that order. `load_arrays` applies the same permutation,
computed with tfds' own hashing module (`tfds_example_order`), to the IDX
arrays. tests/test_data.py runs tfds' own `FashionMNIST` builder on local IDX
files and checks that both sources agree example by example.

Example:

    train = make_dataset("train", 256, training=True, seed=0)
    test = make_dataset("test", 256, training=False)
    print(source_description())
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import socket
import urllib.parse
import zlib
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported lazily: parsing IDX files does not need it.
    import tensorflow as tf

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "KERASBN_DATA_DIR"
TFDS_DIR_ENV = "KERASBN_TFDS_DIR"
TFDS_SOURCE = "tfds"
TFDS_NAME = "fashion_mnist"

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPLITS = ("train", "test")
IMAGE_SIZE = 28
NUM_EXAMPLES = {"train": 60000, "test": 10000}

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# SHA-256 of the *decompressed* content of the original files
# (https://github.com/zalandoresearch/fashion-mnist); Debian's copies decompress to the same bytes.
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes
_HOW_TO_GET = (
    "To get the original files: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs them in "
    f"{DEFAULT_DATA_DIR}), or download the four .gz files from https://github.com/zalandoresearch/fashion-mnist "
    f"into a folder given as `data_dir` (--data-dir) or ${DATA_DIR_ENV}; or use `data_dir='{TFDS_SOURCE}'` "
    "to let tensorflow-datasets download them (needs network)."
)


class DataError(RuntimeError):
    """The dataset cannot be had: a file is missing, truncated or corrupt, or the download failed.

    The message names the file and says how to get a good copy.
    """


# --------------------------------------------------------------- source


def _resolve_source(data_dir: Optional[str]) -> Tuple[str, Optional[str]]:
    """Returns `("local", folder)` or `("tfds", None)`.

    Raises:
        DataError: if a folder named by `data_dir` or `$KERASBN_DATA_DIR` does not exist.
    """
    if data_dir is not None:
        origin = f"data_dir={data_dir!r}"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir = os.environ[DATA_DIR_ENV]
        origin = f"${DATA_DIR_ENV}={data_dir!r}"
    else:
        # The default folder is only a guess: without it, tfds downloads.
        return ("local", DEFAULT_DATA_DIR) if os.path.isdir(DEFAULT_DATA_DIR) else (TFDS_SOURCE, None)
    data_dir = os.fspath(data_dir)
    if data_dir == TFDS_SOURCE:
        return TFDS_SOURCE, None
    folder = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(folder):
        raise DataError(f"Fashion-MNIST folder {folder} ({origin}) does not exist or is not a folder. {_HOW_TO_GET}")
    return "local", folder


def _tfds_dir() -> Optional[str]:
    """Where tfds keeps its prepared data: $KERASBN_TFDS_DIR, else tfds' own default."""
    return os.environ.get(TFDS_DIR_ENV) or None


def source_description(data_dir: Optional[str] = None) -> str:
    """Says in words where `load_arrays` and `make_dataset` take the data from.

    Args:
        data_dir: As for `load_arrays`.

    Returns:
        E.g. "local IDX files at /usr/share/datasets/fashion-mnist (sha256 verified)".

    Raises:
        DataError: if `data_dir` (or `$KERASBN_DATA_DIR`) names a folder that does not exist.
    """
    kind, folder = _resolve_source(data_dir)
    if kind == "local":
        return f"local IDX files at {folder} (sha256 verified)"
    return f"tensorflow-datasets '{TFDS_NAME}' (downloaded and prepared in {_tfds_dir() or 'the tfds default data dir'})"


# --------------------------------------------------------------- order


@functools.lru_cache(maxsize=8)
def _cached_order(split: str, num_examples: int) -> np.ndarray:
    # Imports only tfds' small hashing module, not TensorFlow.
    from tensorflow_datasets.core import hashing

    hasher = hashing.Hasher(split)  # tfds salts with the split name
    hashes = [hasher.hash_key(index) for index in range(num_examples)]  # key: the IDX index, as tfds' builder yields
    order = np.array(sorted(range(num_examples), key=hashes.__getitem__), dtype=np.int64)
    order.setflags(write=False)
    return order


def tfds_example_order(split: str, num_examples: int) -> np.ndarray:
    """The order in which tfds stores the examples of an IDX file.

    tfds' MNIST-family builders yield each example keyed by its index in the
    IDX file; tfds' writer sorts examples by the md5 hash of the key salted
    with the split name, and reading without `shuffle_files` returns them in
    that order. `idx_array[tfds_example_order(split, n)]` is therefore the
    order of `tfds.load("fashion_mnist", split=split)`.

    Args:
        split: "train" or "test" (the hash salt).
        num_examples: Number of examples in the IDX file.

    Returns:
        int64 array: position i holds the IDX index of tfds' i-th example.
    """
    _check_split(split)
    return _cached_order(split, int(num_examples))


# --------------------------------------------------------------- IDX parsing


def _read_idx(path: str, *, ndim: int, expected_sha256: Optional[str]) -> np.ndarray:
    """Decompresses, checks and parses one gzip'd IDX file of unsigned bytes."""
    problem = f"Fashion-MNIST file {path}"
    try:
        with open(path, "rb") as file:
            compressed = file.read()
    except FileNotFoundError:
        raise DataError(f"{problem} is missing. {_HOW_TO_GET}") from None
    except OSError as error:
        raise DataError(f"{problem} cannot be read ({error}). {_HOW_TO_GET}") from error
    try:
        raw = gzip.decompress(compressed)
    except EOFError as error:  # the gzip stream ends early
        raise DataError(f"{problem} is truncated ({error}). {_HOW_TO_GET}") from error
    except (OSError, zlib.error) as error:  # gzip.BadGzipFile (bad header, CRC) is an OSError
        raise DataError(f"{problem} is corrupt: not a valid gzip file ({error}). {_HOW_TO_GET}") from error

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{problem} is truncated: {len(raw)} bytes decompressed, less than its "
            f"{header_size}-byte IDX header. {_HOW_TO_GET}"
        )
    zero, type_code, file_ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code != _IDX_UBYTE or file_ndim != ndim:
        raise DataError(
            f"{problem} is corrupt: IDX magic number {raw[:4].hex()} is not {0x0800 + ndim:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}). {_HOW_TO_GET}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{problem} is corrupt: images are {dims[1]}x{dims[2]}, not {IMAGE_SIZE}x{IMAGE_SIZE}. {_HOW_TO_GET}"
        )
    expected_size = header_size + int(np.prod(dims))
    if len(raw) != expected_size:
        state = "truncated" if len(raw) < expected_size else "corrupt"
        raise DataError(
            f"{problem} is {state}: its header promises shape {dims} ({expected_size} bytes decompressed), "
            f"the file holds {len(raw)} bytes. {_HOW_TO_GET}"
        )
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise DataError(
                f"{problem} fails its checksum: the SHA-256 of its decompressed content is {digest}, "
                f"expected {expected_sha256} (the original Fashion-MNIST). {_HOW_TO_GET}"
            )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_local_cached(
    folder: str, split: str, signature: Tuple, expected: Tuple[Optional[str], Optional[str]]
) -> Tuple[np.ndarray, np.ndarray]:
    # `signature` (size and mtime of both files) and `expected` only key the cache: a changed file is re-read.
    del signature
    image_name, label_name = FILES[split]
    image_path, label_path = os.path.join(folder, image_name), os.path.join(folder, label_name)
    images = _read_idx(image_path, ndim=3, expected_sha256=expected[0])
    labels = _read_idx(label_path, ndim=1, expected_sha256=expected[1])
    if len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST files {image_path} and {label_path} disagree: {len(images)} images, "
            f"{len(labels)} labels. {_HOW_TO_GET}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DataError(
            f"Fashion-MNIST file {label_path} is corrupt: label {int(labels.max())} is not a class "
            f"(0..{len(CLASS_NAMES) - 1}). {_HOW_TO_GET}"
        )
    order = tfds_example_order(split, len(labels))
    images, labels = images[order], labels[order].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_local(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    signature = []
    for name in FILES[split]:
        try:
            stat = os.stat(os.path.join(folder, name))
            signature.append((stat.st_size, stat.st_mtime_ns, stat.st_ino))
        except OSError:
            signature.append(None)  # `_read_idx` reports it
    expected = tuple(SHA256.get(name) for name in FILES[split])
    return _load_local_cached(folder, split, tuple(signature), expected)


# --------------------------------------------------------------- tfds


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_TFDS_FAILED_HINT = (
    "Without network: `sudo apt-get install dataset-fashion-mnist` installs the original files in "
    f"{DEFAULT_DATA_DIR}, which are then used by default; or put the four .gz files from "
    f"https://github.com/zalandoresearch/fashion-mnist in a folder given as `data_dir` (--data-dir) or ${DATA_DIR_ENV}."
)


def _download_host() -> str:
    from tensorflow_datasets.image_classification import mnist

    return urllib.parse.urlparse(mnist.FashionMNIST.URL).hostname


def _check_download_host(where: str) -> None:
    """Fails in seconds where tfds' downloader would retry for minutes: the download host cannot be reached."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return  # only the proxy knows; let tfds try
    host = _download_host()
    try:
        socket.create_connection((host, 80), timeout=10).close()
    except OSError as error:
        raise DataError(
            f"Fashion-MNIST is not prepared in {where}, and tensorflow-datasets cannot download it: "
            f"{host} cannot be reached ({error}). {_TFDS_FAILED_HINT}"
        ) from error


@functools.lru_cache(maxsize=4)
def _load_tfds(split: str, tfds_dir: Optional[str]) -> Tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    where = tfds_dir or "the tfds default data dir"
    builder = tfds.builder(TFDS_NAME, data_dir=tfds_dir)
    if not builder.is_prepared():
        _check_download_host(where)
    try:
        builder.download_and_prepare()
        images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
    except Exception as error:  # download and preparation fail in many ways (network, checksum, disk)
        raise DataError(
            f"tensorflow-datasets could not download or read '{TFDS_NAME}' ({split}) in {where}: "
            f"{type(error).__name__}: {error}. {_TFDS_FAILED_HINT}"
        ) from error
    images = np.asarray(images, dtype=np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(labels).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


# --------------------------------------------------------------- public API


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def load_arrays(
    split: str, data_dir: Optional[str] = None, limit: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Loads one split of Fashion-MNIST as NumPy arrays, in tfds' example order.

    Args:
        split: "train" (60,000 examples) or "test" (10,000).
        data_dir: Folder with the four IDX `.gz` files, or "tfds" for the
            tensorflow-datasets download. Default: `$KERASBN_DATA_DIR`, else
            `DEFAULT_DATA_DIR` if it exists, else the tfds download.
        limit: Keep only the first `limit` examples (all if the split is smaller).

    Returns:
        `(images, labels)`: uint8 `[N, 28, 28]` and int64 `[N]` with values in
        0..9 (names in `CLASS_NAMES`). Fresh, writable copies.

    Raises:
        ValueError: for an unknown `split` or a `limit` that is not a positive integer.
        DataError: if a file is missing, truncated or corrupt, fails its SHA-256,
            or the tfds download fails.
    """
    _check_split(split)
    if limit is not None:
        _check_positive_int("limit", limit)
    kind, folder = _resolve_source(data_dir)
    if kind == "local":
        images, labels = _load_local(folder, split)
    else:
        images, labels = _load_tfds(split, _tfds_dir())
    # Copies: the cached arrays stay read-only and intact whatever the caller does.
    return np.array(images[:limit]), np.array(labels[:limit])


def _scale(image, label):
    import tensorflow as tf

    image = tf.cast(image, tf.float32)[..., tf.newaxis] / 255.0
    return image, label


def make_dataset(
    split: str,
    batch_size: int,
    *,
    training: bool,
    data_dir: Optional[str] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    drop_remainder: bool = False,
    cache: bool = True,
) -> "tf.data.Dataset":
    """Fashion-MNIST as a batched `tf.data.Dataset`.

    The pipeline: examples in tfds' order -> (training: cache -> shuffle the
    whole split, seeded, reshuffled on every iteration) -> batch -> scale to
    [0, 1] -> (not training: cache) -> prefetch.

    Args:
        split: "train" or "test".
        batch_size: The global batch size (a distribution strategy splits it
            across replicas).
        training: Shuffle. Only for the train split: the test split is never shuffled.
        data_dir: As for `load_arrays`.
        limit: Use only the first `limit` examples of the split.
        seed: Shuffle seed: the same seed gives the same order in every epoch
            sequence; each new iteration over the dataset is reshuffled.
        drop_remainder: Drop the last, smaller batch.
        cache: Cache in memory: the examples before the shuffle when
            training, else the scaled batches (reused by every evaluation).

    Returns:
        A dataset of `(images, labels)`: float32 `[B, 28, 28, 1]` in [0, 1]
        (NHWC) and int64 `[B]`.

    Raises:
        ValueError: for bad arguments, or `training=True` with the test split.
        DataError: as for `load_arrays`.
    """
    import tensorflow as tf

    _check_split(split)
    _check_positive_int("batch_size", batch_size)
    if training and split != "train":
        raise ValueError(
            f"`training=True` shuffles, and only the train split is shuffled. Received: split={split!r}, training=True"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an integer. Received: seed={seed!r}")
    images, labels = load_arrays(split, data_dir=data_dir, limit=limit)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        # Cache and shuffle single uint8 examples: the shuffle must come before batching, and after the
        # cache, so that every epoch gets a new order.
        if cache:
            dataset = dataset.cache()
        dataset = dataset.shuffle(len(labels), seed=int(seed), reshuffle_each_iteration=True)
    # Scaling whole batches is ~10x cheaper than one map call per example.
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(_scale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache and not training:
        dataset = dataset.cache()  # fixed order: the scaled batches themselves are reused every pass
    return dataset.prefetch(tf.data.AUTOTUNE)
