"""Loaders over prepared shards: the only reader of WebDataset in the project.

Training reads *resampled* shards (drawn with replacement, as WebDataset's ResampledShards) so every rank yields full
batches forever and an "epoch" is a fixed number of steps derived from the manifest (OpenCLIP's loader):
every rank runs the same number of steps, so DDP never hangs on a short rank. Evaluation reads a
split once, in manifest order. Shards are opened through fsspec, so any URL works.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
from typing import Callable, Iterator, Optional, Sequence

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_prep import schema
from data_prep.atomic import atomic_open
from data_prep.manifest import read_manifest, shard_urls
from pipeline import console
from pipeline.augment import BatchColour, CropFlipViews
from pipeline.errors import HardnegError


def _open_streams(urls: Iterator[dict]) -> Iterator[dict]:
    """Pipeline stage: {"url"} -> {"url", "stream"} opened with fsspec (WebDataset has no s3:// opener)."""
    for item in urls:
        url = item["url"]
        try:
            with fsspec.open(url, "rb") as stream:
                yield {"url": url, "stream": stream}
        except FileNotFoundError:
            raise HardnegError(f"shard listed in the manifest is missing: {url}") from None


def _decode_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _splits(split: str | Sequence[str]) -> tuple[str, ...]:
    return (split,) if isinstance(split, str) else tuple(split)


def steps_per_epoch(manifest: dict, split: str | Sequence[str], global_batch_size: int) -> int:
    """Full global batches in one pass over ``split`` (or several splits together): the same on every rank."""
    names = _splits(split)
    n = sum(manifest["splits"][name]["num_samples"] for name in names)
    steps = n // global_batch_size
    if steps < 1:
        raise HardnegError(
            f"train.global_batch_size={global_batch_size} exceeds the {n} samples of split(s) {'+'.join(names)}"
        )
    return steps


_NAMED_SHARDS: set = set()  # shards this process has named on stderr (training and evaluation alike)


class SkipLedger:
    """Bad samples skipped on one rank: counts overall and per shard; each shard is named once on stderr."""

    def __init__(self, announce: bool = True):
        self.read, self.skipped, self.announce = 0, 0, announce
        self.per_shard: dict[str, int] = {}  # shard URL -> bad samples skipped in it

    def add(self, report: dict) -> None:
        """Count one batch's report {"read": n, "bad": [(url, reason), ...]}."""
        self.read += report["read"]
        for url, reason in report["bad"]:
            self.skipped += 1
            self.per_shard[url] = self.per_shard.get(url, 0) + 1
            if url not in _NAMED_SHARDS and self.announce:
                _NAMED_SHARDS.add(url)
                console.warn(
                    f"skipping a bad sample in {url} ({reason}); further ones in this shard "
                    "are counted in the metric data_skipped"
                )

    def worst(self) -> tuple[Optional[str], int]:
        """(url, bad samples) of the shard with the most skips on this rank; (None, 0) when none."""
        if not self.per_shard:
            return None, 0
        url = max(self.per_shard, key=self.per_shard.__getitem__)
        return url, self.per_shard[url]


def _decode_sample(sample: dict) -> tuple[Image.Image, int]:
    """One raw sample -> (PIL RGB image, label); raises on a missing member or an undecodable image."""
    image = sample[schema.IMAGE_KEY] if schema.IMAGE_KEY in sample else sample[schema.JPEG_KEY]
    decoded = _decode_rgb(image)
    decoded.load()  # a truncated image fails here, not later inside the augmentation
    return decoded, int(sample[schema.LABEL_KEY])


def _reason(exn: BaseException) -> str:
    text = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {text.splitlines()[0][:120]}" if text else type(exn).__name__


class _EpochStreams(torch.utils.data.IterableDataset):
    """One rank's batches from ``start_step`` on; the batch of step s is a function of (seed, rank, s).

    Steps are dealt to ``readers`` raw streams by s % readers. The stream of (epoch e, residue r) draws
    shards with replacement from a ``random.Random`` seeded by (seed, rank, e, r), shuffles raw samples
    in a buffer seeded the same way, and cuts them into windows of ``batch_size``: its k-th window is the
    k-th batch of that stream. A resume therefore re-opens the stream and skips the earlier windows
    undecoded. Bad samples of a window are skipped (WebDataset handlers on the tar level, the same
    handler on decoding) and their slots refilled from the window's good samples, so every batch is
    full and every rank runs the same steps. The augmentation of step s draws from the global torch RNG
    seeded by (seed, rank, s) inside ``fork_rng``, so it neither depends on nor moves the caller's RNG.
    """

    def __init__(
        self,
        urls,
        two_views,
        batch_size,
        *,
        rank,
        seed,
        shuffle_buffer,
        readers,
        start_step,
        steps_per_epoch,
        batch_views=None,
    ):
        super().__init__()
        self.urls, self.two_views, self.batch_size = list(urls), two_views, batch_size
        self.batch_views = batch_views  # optional per-batch step on the stacked views (augment.where=batch)
        self.rank, self.seed, self.shuffle_buffer, self.readers = rank, seed, shuffle_buffer, readers
        self.start_step, self.spe = start_step, steps_per_epoch

    def _raw(self, epoch: int, residue: int, bad: list) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/{self.rank}/{epoch}/{residue}")
        current = {"url": None}

        def shards():
            while True:
                current["url"] = rng.choice(self.urls)
                yield {"url": current["url"]}

        def on_error(exn: BaseException) -> bool:  # WebDataset's handler protocol: True = skip and go on
            bad.append((current["url"], _reason(exn)))
            return True

        samples = group_by_keys(tar_file_expander(_open_streams(shards()), handler=on_error), handler=on_error)
        if self.shuffle_buffer:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)
        return samples

    def _batch(self, window: list, step: int, bad: list) -> tuple:
        good = [(image, label) for _, image, label in decode_samples(window, bad)]
        good = refilled(good, len(window))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash_seed(self.seed, self.rank, step))
            views = [(*self.two_views(image), label) for image, label in good]
            # drawn from the same step-seeded RNG: a resume stays exact
            return stacked_views(views, self.batch_views)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        residue = (self.start_step + worker) % self.readers  # the DataLoader deals batches round-robin
        epoch = self.start_step // self.spe if self.spe else 0
        while True:
            first_in_epoch = epoch * self.spe if self.spe else 0
            end = (epoch + 1) * self.spe if self.spe else None
            begin = max(self.start_step, first_in_epoch)
            origin = first_in_epoch + (residue - first_in_epoch) % self.readers  # this stream's first step
            step = begin + (residue - begin) % self.readers  # this worker's first step in the epoch
            bad: list = []
            raw = self._raw(epoch, residue, bad)
            skip = (step - origin) // self.readers * self.batch_size
            for _ in itertools.islice(raw, skip):  # windows served before the resume: read, never decoded
                pass
            bad.clear()  # counted by the run that read them
            while end is None or step < end:
                window = list(itertools.islice(raw, self.batch_size))
                reads = len(window)
                batch = self._batch(window, step, bad)
                yield (*batch, {"read": reads, "bad": list(bad)})
                bad.clear()
                step += self.readers
            epoch += 1


def decode_samples(window: list, bad: list) -> list[tuple[int, Image.Image, int]]:
    """(index in ``window``, image, label) of every raw sample that decodes; the others are recorded in ``bad``
    (url, reason), as the tar-level handler records its own. HardnegError when none of them decodes."""
    good = []
    for index, sample in enumerate(window):
        if sample is None:  # a slot the caller could not fill (it recorded why)
            continue
        try:
            good.append((index, *_decode_sample(sample)))
        except Exception as exn:  # noqa: BLE001 -- the same record as the tar-level handler
            bad.append((sample.get("__url__"), _reason(exn)))
    if not good:
        raise HardnegError(
            f"every sample of a batch of {len(window)} was unreadable (last from "
            f"{bad[-1][0]}: {bad[-1][1]}); run `hardneg prep verify` on the data"
        )
    return good


def refilled(good: list, size: int) -> list:
    """``good`` cycled to ``size`` entries: the slots of skipped samples refilled, so every batch is full."""
    return good + [good[i % len(good)] for i in range(size - len(good))]


def stacked_views(views: list[tuple], batch_views: Optional[Callable]) -> tuple:
    """Per-sample (*views, label) tuples -> (*stacked views, labels), then the per-batch view step if any
    (drawn from the caller's RNG state)."""
    columns = list(zip(*views, strict=True))
    tensors = [torch.stack(c) for c in columns[:-1]]
    if batch_views is not None:
        tensors = batch_views(tensors)
    return (*tensors, torch.as_tensor(columns[-1]))


def loader_stream(dataset: torch.utils.data.IterableDataset, loader_workers: int) -> Iterator:
    """Iterate ``dataset`` in this process (0 workers) or through a DataLoader of ``loader_workers`` persistent
    workers, each item passed through as it is (batch_size=None), pinned for non-blocking H2D copies."""
    if loader_workers == 0:
        return iter(dataset)
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=loader_workers,
            persistent_workers=True,
            pin_memory=torch.cuda.is_available(),
        )
    )


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (sha256): independent streams for (seed, rank, step) tuples."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def train_batches(
    data_path: str,
    split: str | Sequence[str],
    two_views: Callable,
    batch_size: int,
    *,
    rank: int,
    seed: int,
    shuffle_buffer: int = 1000,
    loader_workers: int = 0,
    start_step: int = 0,
    steps_per_epoch: Optional[int] = None,
    ledger: Optional[SkipLedger] = None,
    batch_views: Optional[Callable] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (view1 (b,3,S,S), view2 (b,3,S,S), labels (b,)) batches for one rank, b = batch_size.

    ``two_views`` maps an image to a tuple of tensors; a 1-tuple (augment.where=device: the uint8
    image) gives (images, labels) batches instead. Several splits are read as one pool of shards
    (resampled uniformly, so each split in proportion to its shard count). The batch of step s is a
    function of (seed, rank, s, loader_workers) -- see _EpochStreams -- so starting at ``start_step``
    yields exactly what an uninterrupted stream yields from there. Bad samples are skipped and counted
    into ``ledger``.
    """
    manifest = read_manifest(data_path)
    urls = [url for name in _splits(split) for url in shard_urls(data_path, manifest, name)]
    ledger = ledger if ledger is not None else SkipLedger()
    dataset = _EpochStreams(
        urls,
        two_views,
        batch_size,
        rank=rank,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        readers=max(1, loader_workers),
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        batch_views=batch_views,
    )
    for *batch, report in loader_stream(dataset, loader_workers):
        ledger.add(report)
        yield tuple(batch)


def _readable(urls: Iterator[str], ledger: SkipLedger) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) of every readable sample of the shards at ``urls``; bad ones are skipped into ``ledger``."""
    current = {"url": None}

    def named(urls):
        for url in urls:
            current["url"] = url
            yield {"url": url}

    def on_error(exn: BaseException) -> bool:
        ledger.add({"read": 0, "bad": [(current["url"], _reason(exn))]})
        return True

    for sample in group_by_keys(tar_file_expander(_open_streams(named(urls)), handler=on_error), handler=on_error):
        try:
            yield _decode_sample(sample)
        except Exception as exn:  # noqa: BLE001 -- a sample that fails to decode is skipped and counted (the skip budget decides)
            ledger.add({"read": 0, "bad": [(sample.get("__url__"), _reason(exn))]})


def split_files(manifest: dict, split: str) -> tuple[bool, bool]:
    """(has WebDataset shards, has an FFCV file) for ``split`` of a manifest."""
    info = manifest["splits"][split]
    return bool(info["shards"]), bool(info.get("ffcv"))


def require_ffcv() -> None:
    """HardnegError, one line, when FFCV's loader cannot be imported here (data.format=ffcv needs it)."""
    try:
        import ffcv.loader  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken native build (OSError, numba errors)
        raise HardnegError(
            f"FFCV is unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"install it with `make setup` or set data.format=wds"
        ) from None


def _ffcv_images(path: str, order: Optional[np.ndarray] = None) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) of a local .beton, in file order or ``order``: read straight from the file (FFCV's Reader
    for the metadata and allocation table), so evaluation needs no compiled loader and no fixed image size."""
    try:
        from ffcv.reader import Reader
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken native build (OSError, numba errors)
        raise HardnegError(
            f"FFCV is unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"install it with `make setup`, or evaluate data prepared with --format wds or both"
        ) from None
    reader = Reader(path)
    image_col = f"f{reader.field_names.index(schema.FFCV_IMAGE_FIELD)}"
    label_col = f"f{reader.field_names.index(schema.FFCV_LABEL_FIELD)}"
    images, labels = reader.metadata[image_col], np.asarray(reader.metadata[label_col]).reshape(-1)
    table = reader.alloc_table
    by_ptr = np.argsort(table["ptr"])
    ptrs, sizes = table["ptr"][by_ptr], table["size"][by_ptr]
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for i in range(len(labels)) if order is None else order:
        meta = images[i]
        start = int(meta["data_ptr"])
        size = int(sizes[np.searchsorted(ptrs, start)])
        blob = raw[start : start + size]
        h, w = int(meta["height"]), int(meta["width"])
        if int(meta["mode"]) == 1:  # raw: h*w*3 RGB bytes (FFCV's IMAGE_MODES["raw"])
            image = Image.fromarray(np.array(blob[: h * w * 3]).reshape(h, w, 3), "RGB")
        else:
            image = _decode_rgb(blob.tobytes())
        yield image, int(labels[i])


def _labelled_stream(data_path: str, split: str, rng: Optional[random.Random]) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) of every readable sample of ``split``: from its WebDataset shards (shard order shuffled by
    ``rng``, at once), or from its FFCV file when it has no shards (data prepared with --format ffcv; sample order
    shuffled by ``rng``)."""
    manifest = read_manifest(data_path)
    urls = shard_urls(data_path, manifest, split)
    if not urls and split_files(manifest, split)[1]:
        path = _ffcv_file(data_path, manifest, split, None)
        n = manifest["splits"][split]["ffcv"]["num_samples"]
        order = None if rng is None else np.random.default_rng(rng.randrange(2**32)).permutation(n)
        return _ffcv_images(path, order)
    if not urls:
        raise HardnegError(f"split '{split}' of {data_path} holds no WebDataset shards and no FFCV file")
    if rng is not None:
        rng.shuffle(urls)
    return _readable(iter(urls), SkipLedger())


def labelled_images(data_path: str, split: str) -> Iterator[tuple[Image.Image, int]]:
    """Every readable (image, label) of ``split`` once, in manifest order (bad samples skipped and named);
    read from the split's FFCV file when it has no WebDataset shards."""
    yield from _labelled_stream(data_path, split, None)


def _batched(pairs: Iterator[tuple[Image.Image, int]], transform: Callable, batch_size: int):
    """(image, label) pairs -> (images (b,3,S,S), labels (b,)) batches; the last one may be short."""
    images, labels = [], []
    for image, label in pairs:
        images.append(transform(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


def eval_batches(
    data_path: str, split: str, transform: Callable, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (b,3,S,S), labels (b,)) over ``split`` once, in manifest order; the last batch may be short."""
    yield from _batched(labelled_images(data_path, split), transform, batch_size)


def raw_pixels(data_path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n, H*W*3) float in [0,1], labels (n,)): the raw-pixel baseline's features."""
    pixels, labels = [], []
    for image, label in labelled_images(data_path, split):
        pixels.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
        labels.append(label)
    if not pixels:
        raise HardnegError(f"split '{split}' of {data_path} holds no samples")
    sizes = {p.shape for p in pixels}
    if len(sizes) > 1:
        raise HardnegError(f"raw-pixel baseline needs images of one size; split '{split}' has {len(sizes)} sizes")
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels)


def labelled_batches(
    data_path: str, split: str, transform: Callable, batch_size: int, *, seed: int, shuffle_buffer: int = 1000
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over ``split``: (images (b,3,S,S), labels (b,)), the last batch may be short."""
    rng = random.Random(seed)
    stream = _labelled_stream(data_path, split, rng)
    if shuffle_buffer:
        stream = wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=rng)(stream)
    yield from _batched(stream, transform, batch_size)


# ---- FFCV: the same (view1, view2, labels) batches from a split's .beton -------------------------------


def _ffcv_file(data_path: str, manifest: dict, split: str, cache_dir) -> str:
    """Local path of ``split``'s .beton: itself when local, else a sha256-named copy in the cache."""
    import hashlib
    import os

    splits = manifest["splits"]
    if split not in splits:
        raise HardnegError(f"unknown split '{split}'; available: {', '.join(splits) or 'none'}")
    entry = splits[split].get("ffcv")
    if not entry:
        raise HardnegError(
            f"split '{split}' of {data_path} has no FFCV file; "
            f"run `hardneg prep SOURCE OUT --format ffcv` (or both), or set data.format=wds"
        )
    url = f"{data_path.rstrip('/')}/{entry['path']}"
    fs, path = fsspec.core.url_to_fs(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        if not os.path.isfile(path):
            raise HardnegError(f"FFCV file listed in the manifest is missing: {url}")
        return path
    cache = os.path.join(
        cache_dir or os.environ.get("HARDNEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hardneg"),
        "ffcv",
    )
    target = os.path.join(os.path.expanduser(cache), f"{entry['sha256']}.beton")
    if os.path.isfile(target) and os.path.getsize(target) == entry["bytes"]:
        return target  # named by its sha256 and renamed into place whole: what is there is right
    os.makedirs(os.path.dirname(target), exist_ok=True)
    digest = hashlib.sha256()
    try:  # every rank of a node may copy at once; each renames whole, only after the sha256 matched
        with fs.open(path, "rb") as src, atomic_open(target) as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                digest.update(chunk)
                dst.write(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise HardnegError(f"{url} differs from its manifest (sha256); run `hardneg prep verify {data_path}`")
    except FileNotFoundError:
        raise HardnegError(f"FFCV file listed in the manifest is missing: {url}") from None
    except OSError as e:
        raise HardnegError(f"cannot copy {url} to the cache {cache}: {e}") from None
    return target


def ffcv_train_batches(
    data_path: str,
    split: str,
    augment_cfg,
    batch_size: int,
    *,
    rank: int,
    seed: int,
    world_size: int = 1,
    loader_workers: int = 0,
    cache_dir=None,
    device: torch.device | str = "cpu",
    ledger: Optional[SkipLedger] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (view1 (b,3,S,S), view2 (b,3,S,S), labels (b,)) batches for one rank, like train_batches.

    FFCV decodes with a random resized crop + flip per view (compiled, ``loader_workers`` threads); the
    rest of ``augment_cfg``'s recipe (pipeline.config.AugmentConfig) runs on the batch: augment.BatchColour,
    the kornia steps of augment.where=device and =batch. A sample whose JPEG does not decode is skipped,
    counted into ``ledger`` and named once with the .beton's URL and its index (see _undecodable_jpeg);
    its slot is refilled from the batch's good samples, so batches stay full. Order: RANDOM
    with ``distributed=True`` semantics for this (rank, world_size) -- every epoch a fresh permutation,
    padded to a multiple of the world and dealt round-robin, full batches only -- so every rank yields the
    same number of batches. A remote .beton is copied once into the local cache. On a CUDA ``device`` the
    decoded uint8 crops go straight to it (FFCV's ToDevice, non-blocking) and the colour steps run there.

    Long on purpose: FFCV's Loader is one declarative pipeline spec; splitting it would scatter one object.
    """
    try:
        from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
        from ffcv.traversal_order.base import TraversalOrder
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken native build (OSError, numba errors)
        raise HardnegError(
            f"FFCV is unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"install it with `make setup` or set data.format=wds"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise HardnegError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
    manifest = read_manifest(data_path)
    path = _ffcv_file(data_path, manifest, split, cache_dir)
    url = f"{data_path.rstrip('/')}/{manifest['splits'][split]['ffcv']['path']}"  # what a skip is named by
    ledger = ledger if ledger is not None else SkipLedger()
    per_rank = -(-manifest["splits"][split]["num_samples"] // world_size)
    if per_rank // batch_size < 1:
        raise HardnegError(
            f"batch size {batch_size} x {world_size} ranks exceeds the "
            f"{manifest['splits'][split]['num_samples']} samples of split '{split}'"
        )

    class RankRandom(TraversalOrder):
        """FFCV's Random order with distributed=True, for an explicit rank and world (no process group)."""

        def __init__(self):  # FFCV calls the instance with the loader
            pass

        def __call__(self, loader):
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int):
            return rank_order(self.indices, self.seed, epoch, rank, world_size)

    size = augment_cfg.image_size
    device = torch.device(device)
    # uint8 crops cross to the GPU (4x fewer bytes than float), before the permute to (B, 3, S, S)
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []

    def view() -> PipelineSpec:
        crop = RandomResizedCropRGBImageDecoder(
            (size, size), scale=(augment_cfg.crop_scale_min, augment_cfg.crop_scale_max)
        )
        flips = [RandomHorizontalFlip(augment_cfg.hflip_p)] if augment_cfg.hflip_p > 0 else []
        return PipelineSpec(
            schema.FFCV_IMAGE_FIELD, decoder=crop, transforms=flips + [ToTensor(), *to_device, ToTorchImage()]
        )

    threads = torch.get_num_threads()  # FFCV sets torch's thread count to its own: put it back each time
    loader = Loader(
        path,
        batch_size=batch_size,
        num_workers=max(1, loader_workers),
        order=RankRandom(),
        distributed=world_size > 1,
        seed=seed % (2**31),
        drop_last=True,
        os_cache=True,
        pipelines={
            schema.FFCV_IMAGE_FIELD: None,
            schema.FFCV_LABEL_FIELD: [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
            "view1": view(),
            "view2": view(),
            "undecodable": PipelineSpec(schema.FFCV_IMAGE_FIELD, decoder=_undecodable_jpeg(), transforms=[ToTensor()]),
        },
    )
    torch.set_num_threads(threads)
    colour = BatchColour(augment_cfg)
    while True:
        epoch = iter(loader)
        torch.set_num_threads(threads)
        for labels, v1, v2, undecodable in epoch:  # FFCV reuses its buffers: copy out before the next batch
            undecodable = undecodable.view(-1)  # on the host: reading it costs no device sync
            bad = undecodable[undecodable >= 0].tolist()
            ledger.add({"read": len(undecodable), "bad": [(url, f"sample {i}: undecodable JPEG") for i in bad]})
            if bad:
                keep = _refill(undecodable < 0, url, data_path).to(v1.device)
                v1, v2, labels = v1[keep], v2[keep], labels[keep]
            yield colour(v1), colour(v2), labels.clone().long()


def _refill(good: torch.Tensor, url: str, data_path: str) -> torch.Tensor:
    """Row indices of a full batch from its ``good`` (b,) rows: the good ones, then copies of them in turn."""
    rows = good.nonzero().flatten()
    if not len(rows):
        raise HardnegError(
            f"every sample of a batch of {len(good)} from {url} was undecodable; run `hardneg prep verify {data_path}`"
        )
    return torch.cat([rows, rows[torch.arange(len(good) - len(rows)) % len(rows)]])


def _undecodable_jpeg():
    """An FFCV decoder for the image field: per sample (1,) int64, its index when its JPEG does not decode, else -1.

    Why a decoder of its own: FFCV's image decoders are compiled (numba), so no Python try/except can run per
    sample inside them, and they ignore libjpeg-turbo's return code -- a corrupt JPEG silently becomes garbage
    pixels. This third pipeline over the same field runs the same decode (FFCV's imdecode) at 1/8 scale and keeps
    that return code: turbojpeg reads the whole entropy-coded stream at any scale, where corruption shows (as an
    error or a warning, both -1), while the inverse DCT and colour conversion shrink 64-fold. Measured on this
    project's 2-core CPU: ~1/5 of one full decode for 256x256 JPEGs (each view decodes in full), and in 2,000
    random byte corruptions of a 64x64 JPEG it failed exactly where the full decode failed. Raw (uncompressed)
    samples cannot be undecodable and cost nothing. Checking once ahead of training instead would decode a whole
    ImageNet before the first step; checking only the markers would miss a corrupt middle.
    """
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class UndecodableJpeg(Operation):
        def declare_state_and_memory(self, previous_state):
            scratch = (int(self.metadata["height"].max()) // 8 + 2) * (int(self.metadata["width"].max()) // 8 + 2) * 3
            index, byte = np.dtype("<i8"), np.dtype("<u1")
            return (
                replace(previous_state, jit_mode=True, shape=(1,), dtype=index),
                (AllocationQuery((1,), index), AllocationQuery((scratch,), byte)),
            )

        def generate_code(self):
            mem_read, jpg, my_range = self.memory_read, IMAGE_MODES["jpg"], Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)

            def check(batch_indices, my_storage, metadata, storage_state):
                destination, scratch = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    destination[dst_ix, 0] = -1
                    if field["mode"] == jpg:
                        h, w = np.uint32(field["height"]), np.uint32(field["width"])
                        data = mem_read(field["data_ptr"], storage_state)
                        if imdecode_c(data, scratch[dst_ix], h, w, h, w, 0, 0, 1, 8, False, False) != 0:
                            destination[dst_ix, 0] = source_ix
                return destination[: len(batch_indices)]

            check.is_parallel = True
            return check

    return UndecodableJpeg()


def rank_order(indices: np.ndarray, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The sample order of one rank in one epoch: exactly torch's DistributedSampler(shuffle=True,
    drop_last=False) -- what FFCV's RANDOM order does with distributed=True -- for an explicit rank."""
    sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
        indices,  # type: ignore[arg-type]  # a sampler reads only len() of its dataset
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    return indices[np.array(list(sampler), dtype=np.int64)]


# ---- augment.where=batch: WebDataset with both views made per batch in the loader workers ------------------


class _BatchColour:
    """The per-batch step of augment.where=batch: SimCLR's colour steps on each stacked view (picklable for
    loader workers)."""

    def __init__(self, augment_cfg) -> None:
        self.cfg = augment_cfg
        self._colour: Optional[BatchColour] = None  # built where it runs (each loader worker)

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "_colour": None}

    def __call__(self, views: list) -> list:
        if self._colour is None:
            self._colour = BatchColour(self.cfg)
        return [self._colour(v) for v in views]


def batched_train_batches(
    data_path: str,
    split: str | Sequence[str],
    augment_cfg,
    batch_size: int,
    *,
    rank: int,
    seed: int,
    shuffle_buffer: int = 1000,
    loader_workers: int = 0,
    start_step: int = 0,
    steps_per_epoch: Optional[int] = None,
    ledger: Optional[SkipLedger] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """train_batches' (view1, view2, labels) stream, faster on a CPU: each worker decodes, crops and flips every
    image to uint8 (per sample), then runs SimCLR's colour steps on the whole batch with per-sample parameters
    (augment.BatchColour, kornia) -- the same recipe as augment.view_transform, one vectorised pass instead of B.
    Seekable like train_batches: the batch of step s is a function of (seed, rank, s, loader_workers)."""
    return train_batches(
        data_path,
        split,
        CropFlipViews(augment_cfg),
        batch_size,
        rank=rank,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        loader_workers=loader_workers,
        start_step=start_step,
        steps_per_epoch=steps_per_epoch,
        ledger=ledger,
        batch_views=_BatchColour(augment_cfg),
    )


# ---- one entry point for the step loop, whatever the format ------------------------------------------------


def _single(transform):
    """Loader mapping for augment.where=device: one uint8 tensor per image (views are made on device)."""
    return lambda image: (transform(image),)


def train_loader(cfg, rank: int, world_size: int, device: torch.device, start_step: int, spe: int, ledger: SkipLedger):
    """(endless (view1, view2, labels) or (images, labels) batches of this rank from ``start_step`` on, the
    on-device view maker or None): FFCV, batched WebDataset or per-sample WebDataset, as the config says."""

    per_rank = cfg.train.global_batch_size // world_size
    if cfg.data.format == "ffcv":  # FFCV makes the two views itself (crop/flip in its pipeline)
        return ffcv_train_batches(
            cfg.data.path,
            cfg.data.pretrain[0],  # one split: validated
            cfg.augment,
            per_rank,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed * 1_000_003 + start_step,
            loader_workers=cfg.data.loader_workers,
            cache_dir=cfg.data.cache_dir,
            device=device,
            ledger=ledger,
        ), None
    stream = dict(
        rank=rank,
        seed=cfg.train.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        loader_workers=cfg.data.loader_workers,
        start_step=start_step,
        steps_per_epoch=spe,
        ledger=ledger,
    )
    if cfg.augment.where == "batch":  # both views made per batch in the loader workers, seekable by step
        return batched_train_batches(cfg.data.path, cfg.data.pretrain, cfg.augment, per_rank, **stream), None
    two_views, _, device_views = train_views(cfg, device)
    return train_batches(cfg.data.path, cfg.data.pretrain, two_views, per_rank, **stream), device_views


def train_views(cfg, device: torch.device) -> tuple[Callable, Optional[Callable], Optional[Callable]]:
    """(per-sample view maker, per-batch view step or None, on-device view maker or None) for augment.where."""
    from pipeline import augment

    if cfg.augment.where == "batch":
        return CropFlipViews(cfg.augment), _BatchColour(cfg.augment), None
    if cfg.augment.where == "device":
        device_views = augment.DeviceTwoViews(cfg.augment).to(device)
        return _single(augment.to_uint8_tensor(cfg.augment.image_size)), None, device_views
    return augment.TwoViews(augment.view_transform(cfg.augment)), None, None


def pretrain_shards(data_path: str, manifest: dict, split: str | Sequence[str]) -> list[tuple[str, int]]:
    """(url, samples) of every shard of the pretraining split(s), in manifest order."""
    names = _splits(split)
    urls = [url for name in names for url in shard_urls(data_path, manifest, name)]
    counts = [shard["num_samples"] for name in names for shard in manifest["splits"][name]["shards"]]
    return list(zip(urls, counts, strict=True))
