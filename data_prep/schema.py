"""The record format both sides agree on: what a shard sample and a manifest hold.

With manifest.py (the readers) and errors.py, one of the modules of data_prep that the training core may import
(tests/test_boundaries.py); the application (pipeline/app) may import any.

A shard is a WebDataset tar named ``{split}-{index:06d}.tar``; each sample has
  ``__key__``  ``{split}_{source_index:08d}``
  ``png``      the image, RGB, PNG-encoded (lossless), or instead
  ``jpg``      the image, RGB, JPEG (``--image-format jpg``, or ``auto`` for images over 128x128 px)
  ``cls``      the integer label as ASCII text (``-1`` for unlabelled)
  ``json``     ``{"index": source_index, "label": int, "source": str, "file": str|None}`` (+ e.g. ``coarse``)
The manifest ``manifest.json`` sits beside the shards; shard paths in it are relative to it.

An FFCV file ``{split}.beton`` (fields ``image``: RGBImageField, ``label``: IntField) holds a whole
split in the planned (shuffled) order; the manifest lists it under ``splits[split]["ffcv"]``.
"""

from __future__ import annotations

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
IMAGE_KEY = "png"
LABEL_KEY = "cls"
META_KEY = "json"
JPEG_KEY = "jpg"
IMAGE_KEYS = (IMAGE_KEY, JPEG_KEY)  # a sample holds exactly one of these
FFCV_IMAGE_FIELD = "image"
FFCV_LABEL_FIELD = "label"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, source_index: int) -> str:
    """The ``__key__`` of a sample: unique within a dataset, stable across runs."""
    return f"{split}_{source_index:08d}"


def ffcv_name(split: str) -> str:
    """File name of the FFCV file of ``split``."""
    return f"{split}.beton"
