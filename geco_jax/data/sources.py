"""Dataset sources: real image datasets as in-memory NumPy splits.

Every loader returns the same structure::

  {'train': {'image': float32 [N, H, W, C] in [0, 1], 'label': int32 [N]},
   'test':  {'image': ..., 'label': ...}}

Images are always channels-last; a grey-scale dataset has ``C == 1``. Pixels
are ``uint8 / 255`` computed the same way (float32 division, correctly
rounded) by every source, so the same ``uint8`` data gives bit-identical
floats whichever source read it.

Two sources, chosen explicitly; one never falls back to the other:

* ``'npz'`` (``load_npz``): ``<data_dir>/<name>.npz`` with the keys
  ``x_train``, ``y_train``, ``x_test``, ``y_test``, as in the project's shared
  data directory. ``data_dir`` defaults to the environment variable
  ``GECO_DATA_DIR``. No TensorFlow needed. Sample order is the file's order.
* ``'tfds'`` (``load_tfds``): tensorflow-datasets, for ``mnist``,
  ``fashion_mnist``, ``cifar10`` and ``celeb_a``. It never touches the network
  unless asked to (``download=True``): a dataset that is not prepared in
  ``data_dir`` is built offline from the original archives in ``manual_dir``,
  or a ``DatasetNotFoundError`` says what to do. TensorFlow and
  tensorflow-datasets are imported only when this source is used. Sample order
  is the order of the prepared TFDS files, which TFDS shuffles
  deterministically when it builds them: the same examples as the original
  dataset, in another (fixed) order.

``load(name, source, **kwargs)`` dispatches on the source name.

CelebA (``tfds`` only). Each 218 x 178 aligned face is centre-cropped to
140 x 140 (rows 39..178, columns 19..158) and resized to 64 x 64 with
bilinear, antialiased ``tf.image.resize``, then rounded to ``uint8`` (so the
pipeline stores 12 KiB rather than 48 KiB per image while reading) and divided
by 255 like every other dataset. A 140-pixel centre crop keeps the face and
little background, as usual for 64 x 64 CelebA VAEs. CelebA has no class, so
its ``'label'`` is all zeros; its ``validation`` split is not returned. The
full train split is 162,770 images, 8 GB as float32 at 64 x 64 x 3.

Labels of an ``.npz`` file may have shape ``[N]`` or ``[N, 1]`` (as Keras'
``cifar10.load_data`` returns them); the latter is squeezed to ``[N]``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
import zlib
from typing import Callable

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "SOURCES",
    "load",
    "load_npz",
    "load_tfds",
]

GECO_DATA_DIR_ENV = "GECO_DATA_DIR"
"""Environment variable holding the default ``data_dir`` of the npz source."""

TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
"""Environment variable holding the default ``data_dir`` of the tfds source."""

DATASETS = {
    "npz": ("mnist", "fashion_mnist", "cifar10"),
    "tfds": ("mnist", "fashion_mnist", "cifar10", "celeb_a"),
}
"""The dataset names ``load`` accepts, per source."""

SOURCES = tuple(DATASETS)
"""The source names ``load`` accepts."""

SPLITS = ("train", "test")

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""The arrays an ``.npz`` dataset file must hold."""

CELEB_A_CROP = 140
"""Side of the centre crop taken from each 218 x 178 CelebA image."""

CELEB_A_SIZE = 64
"""Side of the CelebA images after resizing the crop."""

_NPZ_CHANNELS = (1, 3)
_READ_BATCH = 2048   # examples per tf.data batch when reading a TFDS split


class DatasetNotFoundError(FileNotFoundError):
  """The data of a dataset is not where the source looked for it.

  The message names the source, the full path it looked at and what fixes it.
  """


# ---------------------------------------------------------------------------
# Shared helpers.


def _check_name(name) -> str:
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty dataset name; got {name!r}.")
  return name


def _to_unit_float(images: np.ndarray) -> np.ndarray:
  """float32 ``images / 255`` of a uint8 array, without a float64 temporary."""
  out = np.empty(images.shape, np.float32)
  np.divide(images, np.float32(255), out=out, dtype=np.float32)
  return out


# ---------------------------------------------------------------------------
# npz source.


def _npz_fix(name: str) -> str:
  return (f"set {GECO_DATA_DIR_ENV}=/path/to/dir holding {name}.npz, or pass "
          "data_dir, or use source='tfds'")


def _npz_path(name: str, data_dir: str | None) -> str:
  """The absolute path of ``<data_dir>/<name>.npz``; raises if it is missing."""
  if data_dir is None:
    data_dir = os.environ.get(GECO_DATA_DIR_ENV, "")
    if not data_dir:
      raise DatasetNotFoundError(
          f"npz source: cannot locate {name}.npz: data_dir is None and "
          f"{GECO_DATA_DIR_ENV} is unset or empty. Fix: {_npz_fix(name)}.")
    given = f"{GECO_DATA_DIR_ENV}={data_dir!r}"
  else:
    given = f"data_dir={data_dir!r}"
  directory = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  path = os.path.join(directory, f"{name}.npz")
  if not os.path.isfile(path):
    if not os.path.isdir(directory):
      why = f"the directory {directory} does not exist"
    else:
      why = f"{directory} holds no file {name}.npz"
    raise DatasetNotFoundError(
        f"npz source: dataset file not found: {path} ({given}; {why}). "
        f"Fix: {_npz_fix(name)}.")
  return path


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays ``NPZ_KEYS`` of an ``.npz`` file (no pickles)."""
  try:
    archive = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError,
          zlib.error) as error:
    raise ValueError(
        f"{path}: could not be read as an .npz archive of "
        f"{list(NPZ_KEYS)}: {error}") from error
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(
        f"{path}: not an .npz archive (np.load read a single array); "
        f"expected an archive holding {list(NPZ_KEYS)}.")
  with archive:
    missing = [key for key in NPZ_KEYS if key not in archive.files]
    if missing:
      raise ValueError(
          f"{path}: missing key(s) {missing}; an npz dataset needs "
          f"{list(NPZ_KEYS)}, and the file holds {sorted(archive.files)}.")
    try:
      return {key: archive[key] for key in NPZ_KEYS}
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as error:
      raise ValueError(
          f"{path}: could not read the arrays {list(NPZ_KEYS)} (a corrupt "
          f"or truncated archive, or object arrays, which need pickle): "
          f"{error}") from error


def _check_npz_split(path: str, split: str, images: np.ndarray,
                     labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Validates one split; returns uint8 NHWC images and 1-D labels."""
  x_key, y_key = f"x_{split}", f"y_{split}"
  if images.dtype != np.uint8:
    raise ValueError(
        f"{path}: {x_key} must be uint8 images (pixel values 0..255); got "
        f"dtype {images.dtype}.")
  if images.ndim == 3:
    images = images[..., None]
  elif images.ndim != 4:
    raise ValueError(
        f"{path}: {x_key} must have shape [N, H, W] or [N, H, W, C]; got "
        f"shape {images.shape}.")
  if images.shape[-1] not in _NPZ_CHANNELS:
    raise ValueError(
        f"{path}: {x_key} must be channels-last with C in {_NPZ_CHANNELS}, "
        f"[N, H, W, C]; got shape {images.shape} (transpose a channels-first "
        "[N, C, H, W] array with x.transpose(0, 2, 3, 1)).")
  if images.shape[0] == 0:
    raise ValueError(f"{path}: {x_key} holds no images (shape "
                     f"{images.shape}).")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{path}: {y_key} must be integer class labels; got dtype "
        f"{labels.dtype}.")
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise ValueError(
        f"{path}: {y_key} must have shape [N] (or [N, 1]); got shape "
        f"{labels.shape}.")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(
        f"{path}: {x_key} and {y_key} must hold the same number of examples; "
        f"got {images.shape[0]} images and {labels.shape[0]} labels.")
  info = np.iinfo(np.int32)
  if labels.dtype.itemsize >= 4 and (labels.min() < info.min or
                                     labels.max() > info.max):
    raise ValueError(
        f"{path}: {y_key} values must fit in int32; got range "
        f"[{labels.min()}, {labels.max()}].")
  return images, labels


def load_npz(name: str,
             data_dir: str | None = None) -> dict[str, dict[str, np.ndarray]]:
  """Loads ``<data_dir>/<name>.npz`` as float32 train and test splits.

  The file must hold ``x_train``, ``y_train``, ``x_test``, ``y_test``: uint8
  images ``[N, H, W]`` or ``[N, H, W, C]`` (C 1 or 3, channels-last) and
  integer labels ``[N]`` or ``[N, 1]``; other keys are ignored. It is read
  with ``allow_pickle=False``.

  Args:
    name: the file's name without ``.npz``, e.g. ``'mnist'``.
    data_dir: the directory holding the file; ``None`` means the environment
      variable ``GECO_DATA_DIR``.

  Returns:
    ``{'train': {'image', 'label'}, 'test': {...}}``: images float32
    ``[N, H, W, C]`` equal to ``uint8 / 255`` (a channel axis is added to
    ``[N, H, W]`` images), labels int32 ``[N]``, in the file's order.

  Raises:
    DatasetNotFoundError: the file does not exist, or ``data_dir`` is None
      and ``GECO_DATA_DIR`` is unset.
    ValueError: a bad name, a file that is not an ``.npz`` archive, a missing
      key, a wrong dtype or shape, image and label counts that differ, or
      train and test images of different shapes; the message names the file.
  """
  name = _check_name(name)
  if os.sep in name or (os.altsep and os.altsep in name) or name.endswith(
      ".npz"):
    raise ValueError(
        f"name must be a bare dataset name such as 'mnist' (the file is "
        f"<data_dir>/<name>.npz); got {name!r}.")
  path = _npz_path(name, data_dir)
  raw = _read_npz(path)
  splits = {}
  for split in SPLITS:
    images, labels = _check_npz_split(path, split, raw.pop(f"x_{split}"),
                                      raw.pop(f"y_{split}"))
    splits[split] = {"image": _to_unit_float(images),
                     "label": labels.astype(np.int32)}
  train_shape = splits["train"]["image"].shape[1:]
  test_shape = splits["test"]["image"].shape[1:]
  if train_shape != test_shape:
    raise ValueError(
        f"{path}: train and test images must have the same [H, W, C]; got "
        f"{train_shape} and {test_shape}.")
  return splits


# ---------------------------------------------------------------------------
# tfds source.


def _import_tfds():
  """Imports TensorFlow and tensorflow-datasets, or says what to install."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "The 'tfds' dataset source needs TensorFlow and tensorflow-datasets "
        f"({error}). Install them with `pip install tensorflow-cpu "
        "tensorflow-datasets` (both are dependencies of geco-jax: `pip "
        "install -e .` installs them), or use source='npz'.") from error
  return tf, tfds


def _celeb_a_image(tf, image):
  """Centre 140 x 140 crop of a CelebA image, resized to 64 x 64 uint8."""
  height = tf.shape(image)[0]
  width = tf.shape(image)[1]
  image = tf.image.crop_to_bounding_box(
      image, (height - CELEB_A_CROP) // 2, (width - CELEB_A_CROP) // 2,
      CELEB_A_CROP, CELEB_A_CROP)
  image = tf.image.resize(image, (CELEB_A_SIZE, CELEB_A_SIZE),
                          method="bilinear", antialias=True)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  return tf.cast(image, tf.uint8)


def _preprocess_fn(tf, name: str) -> Callable | None:
  """The per-example map of a dataset, or None to read the examples as is.

  The map takes and returns example dicts with a uint8 ``'image'`` and an
  integer ``'label'``.
  """
  if name != "celeb_a":
    return None

  def preprocess(example):
    return {"image": _celeb_a_image(tf, example["image"]),
            "label": tf.zeros((), tf.int64)}
  return tf.autograph.experimental.do_not_convert(preprocess)


def _read_split(tf, tfds, builder, split: str,
                preprocess: Callable | None) -> dict[str, np.ndarray]:
  """Reads one split into float32 images and int32 labels, in file order.

  Examples are decoded (and preprocessed, mapped before batching) in the
  tf.data pipeline and copied batch by batch into preallocated arrays, so the
  peak memory is the float32 result plus a few batches.
  """
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if preprocess is not None:
    # Order-preserving: tf.data keeps ``deterministic`` map order by default.
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  count = int(ds.cardinality())
  image_shape = tuple(ds.element_spec["image"].shape)
  known = count >= 0 and None not in image_shape
  if known:
    images = np.empty((count, *image_shape), np.float32)
    labels = np.empty((count,), np.int32)
  else:
    image_batches, label_batches = [], []
  filled = 0
  ds = ds.batch(_READ_BATCH).prefetch(tf.data.AUTOTUNE)
  for batch in tfds.as_numpy(ds):
    image_batch, label_batch = batch["image"], batch["label"]
    size = label_batch.shape[0]
    if known:
      if filled + size > count:
        raise RuntimeError(
            f"tfds split {builder.name}/{split} yielded more than its "
            f"cardinality {count}.")
      np.divide(image_batch, np.float32(255), out=images[filled:filled + size],
                dtype=np.float32)
      labels[filled:filled + size] = label_batch
    else:
      image_batches.append(_to_unit_float(image_batch))
      label_batches.append(label_batch.astype(np.int32))
    filled += size
  if known:
    if filled != count:
      raise RuntimeError(
          f"tfds split {builder.name}/{split} yielded {filled} examples, "
          f"not its cardinality {count}.")
  else:
    if not image_batches:
      raise ValueError(f"tfds split {builder.name}/{split} is empty.")
    images = np.concatenate(image_batches)
    labels = np.concatenate(label_batches)
  return {"image": images, "label": labels}


def _tfds_not_prepared(builder, name: str, given: str, problem: str,
                       files: list[str]) -> DatasetNotFoundError:
  if name in ("mnist", "fashion_mnist"):
    example = f"e.g. ../shared/data/tfds_manual/{name}"
  else:
    example = f"see the TFDS catalog page of {name}"
  if name in DATASETS["npz"]:
    npz = (f"; or use source='npz' with {GECO_DATA_DIR_ENV}=/path/to/dir "
           f"holding {name}.npz")
  else:
    npz = ""
  return DatasetNotFoundError(
      f"tfds source: dataset {name!r} is not prepared at {builder.data_path} "
      f"({given}); {problem} Fix: pass download=True on a machine with "
      f"internet access; or pass manual_dir=<directory holding the original "
      f"archives {files}> ({example}) to build it offline{npz}.")


def load_tfds(name: str,
              data_dir: str | None = None,
              manual_dir: str | None = None,
              download: bool = False) -> dict[str, dict[str, np.ndarray]]:
  """Loads a tensorflow-datasets dataset as float32 train and test splits.

  If the dataset is already prepared in ``data_dir`` it is read as is.
  Otherwise it is built: from the original archives in ``manual_dir`` with
  no network access when ``manual_dir`` is given, by downloading when
  ``download`` is True, and not at all otherwise (a ``DatasetNotFoundError``
  is raised at once, without waiting on the network). With ``manual_dir``
  and ``download=False`` every archive must be present; with
  ``download=True`` the missing ones are downloaded.

  Args:
    name: ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'`` or ``'celeb_a'``.
    data_dir: where TFDS keeps prepared datasets; ``None`` means the
      environment variable ``TFDS_DATA_DIR`` (read at each call), else
      TFDS's default ``~/tensorflow_datasets``.
    manual_dir: a directory holding the dataset's original archives under
      their registered file names (for MNIST: ``train-images-idx3-ubyte.gz``
      and so on), to build the dataset offline.
    download: whether an unprepared dataset may be downloaded.

  Returns:
    ``{'train': {'image', 'label'}, 'test': {...}}``: images float32
    ``[N, H, W, C]`` equal to ``uint8 / 255``, labels int32 ``[N]``, in the
    order of the prepared TFDS files (TFDS shuffles examples, with a fixed
    order, when it builds a dataset). ``celeb_a`` images are 64 x 64 x 3
    (centre 140 x 140 crop, resized) with all-zero labels; see the module
    docstring.

  Raises:
    ValueError: an unknown dataset name.
    ImportError: TensorFlow or tensorflow-datasets is not installed.
    DatasetNotFoundError: the dataset is not prepared and may not be built
      (``download=False`` and no ``manual_dir``, or ``manual_dir`` lacks
      archives); the message gives where it looked and the fixes.
  """
  name = _check_name(name)
  if name not in DATASETS["tfds"]:
    raise ValueError(
        f"Unknown tfds dataset {name!r}; the tfds source supports "
        f"{DATASETS['tfds']}.")
  tf, tfds = _import_tfds()
  if data_dir is None:
    # tfds reads TFDS_DATA_DIR once, when it is imported; read it per call.
    data_dir = os.environ.get(TFDS_DATA_DIR_ENV) or None
    given = (f"data_dir=None and {TFDS_DATA_DIR_ENV}={data_dir!r}"
             if data_dir else
             f"data_dir=None and {TFDS_DATA_DIR_ENV} unset: TFDS's default")
  else:
    given = f"data_dir={data_dir!r}"
  if data_dir is not None:
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    files = sorted(info.filename for info in (builder.url_infos or {}).values()
                   if info.filename)
    if manual_dir is None and not download:
      raise _tfds_not_prepared(
          builder, name, given,
          "download=False and no manual_dir was given, so nothing was "
          "fetched.", files)
    if manual_dir is not None:
      manual_dir = os.path.abspath(os.path.expanduser(os.fspath(manual_dir)))
      missing = [f for f in files
                 if not os.path.isfile(os.path.join(manual_dir, f))]
      if missing and not download:
        raise _tfds_not_prepared(
            builder, name, given,
            f"manual_dir={manual_dir!r} lacks {missing}, and download=False, "
            "so it cannot be built offline.", files)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  preprocess = _preprocess_fn(tf, name)
  return {split: _read_split(tf, tfds, builder, split, preprocess)
          for split in SPLITS}


# ---------------------------------------------------------------------------
# Dispatch.


_LOADERS = {"npz": load_npz, "tfds": load_tfds}


def load(name: str, source: str,
         **kwargs) -> dict[str, dict[str, np.ndarray]]:
  """Loads dataset ``name`` from ``source``, ``'npz'`` or ``'tfds'``.

  ``kwargs`` go to ``load_npz`` (``data_dir``) or ``load_tfds``
  (``data_dir``, ``manual_dir``, ``download``). There is no fallback: a
  dataset missing from the chosen source raises ``DatasetNotFoundError``.

  Raises:
    ValueError: an unknown source, or a dataset name the source does not
      support (the message lists the valid ones).
    DatasetNotFoundError, ImportError, ValueError: as the source's loader.
  """
  if not isinstance(source, str) or source not in _LOADERS:
    raise ValueError(
        f"Unknown dataset source {source!r}; valid sources are {SOURCES}.")
  if name not in DATASETS[source]:
    raise ValueError(
        f"Unknown dataset {name!r} for source {source!r}; valid names are "
        f"{DATASETS[source]}.")
  return _LOADERS[source](name, **kwargs)
