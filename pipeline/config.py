"""Typed, frozen, validated run configuration: the one place defaults live.

load(path, overrides) reads a YAML file holding only what differs from the defaults, applies
dotted ``key=value`` overrides, and returns a frozen ``Config``. Every problem (missing file,
duplicate YAML key, unknown key, wrong type, impossible value) is a one-line ``HardnegError``
naming the key and what is allowed.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.backbones import BACKBONES
from pipeline.errors import HardnegError
from pipeline.methods import DEFAULT_METHOD, METHODS
from pipeline.methods.base import MethodConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    path: str = "demo_out/shards"  # directory (any fsspec URL) holding manifest.json + shards
    format: Literal["wds", "ffcv"] = "wds"  # ffcv: read the split's .beton (hardneg prep --format ffcv|both)
    cache_dir: Optional[str] = None  # local copies of remote .beton files; None: $HARDNEG_CACHE_DIR or ~/.cache/hardneg
    train_split: str = "train"  # labelled: the kNN bank and the linear probe's training set
    eval_split: str = "test"  # touched only by the final evaluation (hardneg eval / reproduce), never for selection
    # what the kNN monitor queries and checkpoints/best is chosen on (hardneg prep --val-fraction writes it);
    # a manifest without it: no kNN monitor during training and no checkpoints/best
    val_split: str = "holdout"
    # what pretraining reads, e.g. [train, unlabeled] for STL-10 as the HCL/DCL releases; empty: train_split
    pretrain_splits: tuple[str, ...] = ()
    shuffle_buffer: int = Field(1000, ge=0)
    # resampled: shards drawn with replacement, the batch of step s a function of (seed, rank, s) (exact resume on
    # the same workers); epoch: each sample once per epoch, the global batch of step s a function of (seed, s),
    # each rank reading its slice, so an elastic restart reads exactly the rest (docs/faults.md)
    order: Literal["resampled", "epoch"] = "resampled"
    loader_workers: int = Field(0, ge=0)
    # bad samples skipped before the run stops: a fraction of the samples read so far (after SKIP_WARMUP_SAMPLES)
    max_skip_fraction: float = Field(0.001, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _epoch_order_reads_shards(self) -> "DataConfig":
        if self.format == "ffcv" and self.order == "epoch":
            raise ValueError("data.order=epoch reads WebDataset shards; with data.format=ffcv use data.order=resampled")
        return self

    @model_validator(mode="after")
    def _one_beton(self) -> "DataConfig":
        if self.format == "ffcv" and len(self.pretrain) > 1:
            raise ValueError(
                f"data.pretrain_splits={list(self.pretrain_splits)} with data.format=ffcv: FFCV reads "
                "one .beton per split; use data.format=wds to pretrain on several splits"
            )
        return self

    @property
    def pretrain(self) -> tuple[str, ...]:
        """The splits pretraining reads: data.pretrain_splits, else (train_split,)."""
        return self.pretrain_splits or (self.train_split,)


class AugmentConfig(_Section):
    """SimCLR two-view augmentation (Chen et al. 2020); the papers' CIFAR recipe by default."""

    image_size: int = Field(32, ge=4)
    crop_scale_min: float = Field(0.08, gt=0.0, le=1.0)
    crop_scale_max: float = Field(1.0, gt=0.0, le=1.0)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    rotation_degrees: float = Field(0.0, ge=0.0, le=180.0)
    jitter_p: float = Field(0.8, ge=0.0, le=1.0)
    brightness: float = Field(0.4, ge=0.0)
    contrast: float = Field(0.4, ge=0.0)
    saturation: float = Field(0.4, ge=0.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0.0, le=1.0)
    blur_p: float = Field(0.0, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    # "loader": per-sample torchvision transforms in the data loader (CPU);
    # "device": decoded images travel as uint8 and both views are made in batches on the training
    # device (kornia, per-sample random parameters), so the CPU is not the bottleneck on a GPU;
    # "batch": the loader workers crop and flip each image to uint8, then run the colour steps on the
    # whole batch with per-sample parameters (data.batched_train_batches; WebDataset only) -- faster on a CPU.
    where: Literal["loader", "device", "batch"] = "loader"

    @model_validator(mode="after")
    def _crop_range(self) -> "AugmentConfig":
        if self.crop_scale_min > self.crop_scale_max:
            raise ValueError(
                f"augment.crop_scale_min={self.crop_scale_min} must be <= augment.crop_scale_max={self.crop_scale_max}"
            )
        return self


class ModelConfig(_Section):
    backbone: str = "resnet18"  # a row of pipeline/backbones.py's BACKBONES: resnet18/34/50, vit_tiny, vit_small
    # ResNets only (backbones.RESNET_KEYS)
    stem: Literal["cifar", "imagenet"] = "cifar"
    width: int = Field(64, ge=4)  # channels of the first stage; 64 is the standard ResNet
    # ViTs only (backbones.VIT_KEYS): pixels per patch side; None: 16 from 128 px images on, else image_size // 8
    patch_size: Optional[int] = Field(None, ge=1)
    proj_hidden_dim: int = Field(512, ge=1)
    proj_dim: int = Field(128, ge=1)
    proj_bn: bool = True  # False: Linear-ReLU-Linear (MoCo-v2's head)
    # SSCL/PSM keep a 3x3 stride-1 max-pool (padding 0) after the CIFAR stem (dhkdhk/SSCL src/model/network.py)
    stem_maxpool: bool = False
    # MoCo's shuffle-BN, single-process form: the key encoder's BN runs over this many sub-batches of a random
    # permutation and the query encoder's over as many sub-batches in order (1: off). MoCo-family only.
    shuffle_bn_groups: int = Field(1, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"model.backbone={value!r}; expected one of {', '.join(BACKBONES)}")
        return value

    @model_validator(mode="after")
    def _keys_of_this_backbone(self) -> "ModelConfig":
        """A ResNet key set for a ViT (or the reverse) is refused, as a loss key of another method is."""
        own = BACKBONES[self.backbone]
        others = {k for b in BACKBONES.values() if b.family != own.family for k in b.keys} - set(own.keys)
        # set to something other than its default: a stored config of a ViT still holds the ResNet defaults
        foreign = sorted(k for k in others if getattr(self, k) != type(self).model_fields[k].default)
        if foreign:
            raise ValueError(
                f"model.{foreign[0]} does not apply to model.backbone={self.backbone} ({own.family}); "
                f"its own keys: {', '.join('model.' + k for k in own.keys)}"
            )
        return self


def _method_settings(value: Any) -> MethodConfig:
    """The ``loss:`` section, validated by the Settings of the method its ``name`` selects (default: DEFAULT_METHOD).

    A tagged union looked up in pipeline.methods.METHODS now, not when this module was imported, so a method
    registered at run time is a method at once; the Settings' own errors keep their location under ``loss``.
    """
    if isinstance(value, MethodConfig):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "loss_section", "loss must be a mapping of settings, got {kind}", {"kind": type(value).__name__}
        )
    name = value.get("name", DEFAULT_METHOD)
    if name not in METHODS:
        raise PydanticCustomError(
            "unknown_method",
            "loss.name={name}: expected one of {expected}",
            {"name": repr(name), "expected": ", ".join(map(repr, METHODS))},
        )
    return METHODS[name].Settings.model_validate({"name": name, **value})


# what to_dict writes is the selected method's fields (SerializeAsAny), not the base class's
LossConfig = SerializeAsAny[Annotated[MethodConfig, PlainValidator(_method_settings)]]


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)  # at lr_reference_batch; the run uses Config.scaled_lr
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # lr x (global batch / reference)^{0, 1, 1/2}
    lr_reference_batch: int = Field(256, ge=1)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    # stop after this many optimizer steps when that comes before train.epochs (short trials); the last, partial
    # epoch ends like any other (kNN, checkpoint) and the learning-rate schedule follows the shorter run
    max_steps: Optional[int] = Field(None, ge=1)
    global_batch_size: int = Field(256, ge=2)
    log_every_steps: int = Field(10, ge=1)
    knn_every_epochs: int = Field(1, ge=0)  # 0: never during training
    checkpoint_every_epochs: int = Field(1, ge=1)
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: only by epochs (and minutes)
    checkpoint_every_minutes: float = Field(0.0, ge=0.0)  # 0: off; decided by rank 0's clock at log steps
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient norm: end the run, or drop the step
    max_nonfinite_steps: int = Field(10, ge=1)  # with on_nonfinite=skip: this many in a row end the run
    # what picks checkpoints/best: kNN top-1 on data.val_split, or the lowest epoch-mean training loss
    # (PSM's release keeps the lowest-loss checkpoint and evaluates it: github.com/dhkdhk/PSM src/train.py)
    best_by: Literal["knn", "loss"] = "knn"
    seed: int = 0
    threads_per_worker: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for the network; losses stay float32
    channels_last: bool = False  # NHWC memory format for the convolutions (faster on tensor cores)
    compile: bool = False  # torch.compile the network
    # samples per forward pass per worker (gradient caching: docs/methods.md, "The chunked step"); null: the whole
    # per-worker batch in one pass (the plain step). Each chunk is one BatchNorm group; must divide the per-worker batch
    chunk_size: Optional[int] = Field(None, ge=1)
    # the loss builds its (anchors x columns) logits this many anchor rows at a time; null: all rows at once
    loss_tile: Optional[int] = Field(None, ge=1)


class ClusterConfig(_Section):
    launcher: Literal["ray", "local"] = "ray"  # local: one plain process, for debugging
    address: Optional[str] = None  # None: start a private local Ray instance
    num_workers: int = Field(2, ge=1)
    # elastic: a lost node restarts the run on the workers that still fit, down to this many (None: exactly num_workers)
    min_workers: Optional[int] = Field(None, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False  # NCCL between GPU workers, gloo between CPU workers
    gpus_per_worker: float = Field(1.0, gt=0.0)  # with use_gpu; a fraction shares a GPU
    storage_path: str = "runs"  # checkpoints; any fsspec URL (s3://, gs://: shared storage for multi-node)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint; -1: unlimited
    # the newest N checkpoints stay in cluster.storage_path under either launcher (null: all); the best one by
    # train.best_by is kept apart, in the MLflow run's artifacts (checkpoints/best)
    checkpoints_to_keep: Optional[int] = Field(3, ge=1)


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "hardneg"
    run_name: Optional[str] = None
    run_id: Optional[str] = None  # attach to this existing MLflow run (set by the launcher)
    artifact_location: Optional[str] = None  # for a new experiment, e.g. s3://bucket/mlflow; default beside the DB
    registered_model: Optional[str] = (
        "hardneg-encoder"  # the trained encoder's model-registry name; null: don't register
    )
    log_model: bool = True
    system_metrics_every_s: float = Field(10.0, ge=0.0)  # CPU/memory/GPU sampling; 0 disables
    flush_timeout_s: float = Field(60.0, ge=0.0)  # at the end, wait this long for an unreachable server, then spool
    plots: bool = True


class EvalConfig(_Section):
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.5, gt=0.0)
    batch_size: int = Field(512, ge=1)
    # Linear probe on the frozen backbone. Defaults: HCL/DCL's protocol (Adam 1e-3, 100 epochs);
    # SSCL/PSM recipes set SGD lr 10 with a cosine schedule, batch 256 (docs/methods.md).
    probe_epochs: int = Field(100, ge=1)
    probe_optimizer: Literal["adam", "sgd"] = "adam"
    probe_lr: float = Field(1e-3, gt=0.0)
    probe_weight_decay: float = Field(1e-6, ge=0.0)
    probe_batch_size: int = Field(256, ge=1)
    probe_augment: bool = True  # re-augment the training split every probe epoch (probe_transform below)
    # crop_flip: RandomResizedCrop(probe_crop_min, 1) + flip; train: the pretraining view (jitter, grey, blur...)
    # with probe_crop_min and probe_blur_p (HCL/DCL's linear.py trains on train_transform; SSCL/PSM's finetune
    # transform is jitter, grey, blur p=.5, RandomResizedCrop(0.25-1), flip)
    probe_transform: Literal["crop_flip", "train"] = "crop_flip"
    probe_crop_min: Optional[float] = Field(None, gt=0.0, le=1.0)  # None: augment.crop_scale_min
    probe_blur_p: Optional[float] = Field(None, ge=0.0, le=1.0)  # probe_transform=train; None: augment.blur_p
    # the resolution evaluation images are resized to (kNN, probe); None: augment.image_size. STL-10 in HCL: 96
    eval_image_size: Optional[int] = Field(None, ge=4)


class Config(_Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = METHODS[DEFAULT_METHOD].Settings.model_validate({})  # one Settings per method: its keys
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _batch_serves_method(self) -> "Config":
        problem = self.loss.batch_problem(self.train.global_batch_size)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "Config":
        workers = 1 if self.cluster.launcher == "local" else self.cluster.num_workers
        if self.train.global_batch_size % workers:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} must divide by cluster.num_workers={workers}"
            )
        low = self.cluster.min_workers
        if low is not None and self.cluster.launcher == "ray":
            if low > self.cluster.num_workers:
                raise ValueError(f"cluster.min_workers={low} exceeds cluster.num_workers={self.cluster.num_workers}")
            bad = [w for w in range(low, self.cluster.num_workers + 1) if self.train.global_batch_size % w]
            if bad:
                raise ValueError(
                    f"train.global_batch_size={self.train.global_batch_size} must divide by every "
                    f"worker count from cluster.min_workers={low} to {self.cluster.num_workers}; not by {bad}"
                )
        return self

    @model_validator(mode="after")
    def _chunks_divide(self) -> "Config":
        chunk, batch = self.train.chunk_size, self.train.global_batch_size
        if chunk is None:
            return self
        if self.cluster.launcher == "local":
            counts = [1]
        else:
            counts = list(range(self.cluster.min_workers or self.cluster.num_workers, self.cluster.num_workers + 1))
        bad = [w for w in counts if batch % w == 0 and (batch // w) % chunk]
        if bad:
            shares = ", ".join(f"{batch // w} at {w} worker{'s' if w > 1 else ''}" for w in bad)
            raise ValueError(
                f"train.chunk_size={chunk} must divide the per-worker batch train.global_batch_size / workers "
                f"for every worker count the run may have; it does not divide {shares}"
            )
        return self

    @property
    def world_size(self) -> int:
        return 1 if self.cluster.launcher == "local" else self.cluster.num_workers

    @property
    def per_worker_batch_size(self) -> int:
        return self.train.global_batch_size // self.world_size

    @property
    def scaled_lr(self) -> float:
        """optim.lr scaled to the global batch per optim.lr_scaling (Goyal et al. 2017: linear; sqrt for Adam-like)."""
        ratio = self.train.global_batch_size / self.optim.lr_reference_batch
        return self.optim.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.optim.lr_scaling]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of letting the last one win."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise HardnegError(f"duplicate key '{key}' in config (line {key_node.start_mark.line + 1})")
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise HardnegError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise HardnegError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise HardnegError(f"cannot read config file {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HardnegError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format_error(err: ValidationError, data: Any) -> str:
    """One line per config, naming the first bad key and what is allowed (``data``: what was validated)."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int))
    if first["type"] == "unknown_method":
        return f"invalid config value {first['msg']}"
    loss = data.get("loss") if isinstance(data, dict) else None
    method = loss.get("name", DEFAULT_METHOD) if isinstance(loss, dict) else None  # whose settings were read
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        if loc[:1] == ("loss",) and method in METHODS:
            return _foreign_loss_key(method, str(loc[-1]), first.get("input"))
        allowed = ", ".join(_allowed_keys(Config, loc))
        return f"unknown config key '{key}'; allowed here: {allowed}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return f"invalid config: {msg}"
    return f"invalid config value {key}={first.get('input')!r}: {msg}"


def _foreign_loss_key(method: str, key: str, value: Any) -> str:
    """The one line for a loss.* key the chosen method does not have (another method's, or none's)."""
    allowed = ", ".join(sorted(METHODS[method].Settings.model_fields))
    owners = [name for name, m in METHODS.items() if key in m.Settings.model_fields]
    if not owners:
        return f"unknown config key 'loss.{key}'; allowed for loss.name={method}: {allowed}"
    return (
        f"loss.{key}={value!r} is not a setting of loss.name={method} (it belongs to {', '.join(owners)}); "
        f"allowed for {method}: {allowed}"
    )


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b=value`` (value parsed as YAML) inside the nested dict ``data``."""
    if "=" not in override:
        raise HardnegError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise HardnegError(f"override '{override}' names no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise HardnegError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(data: dict) -> Config:
    """Validate a nested dict into a frozen Config (HardnegError on any problem)."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise HardnegError(_format_error(e, data)) from None


def load(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read YAML at ``path`` (or the defaults), apply dotted overrides, validate."""
    data = _read_yaml(path) if path else {}
    for override in overrides:
        apply_override(data, override)
    return from_dict(data)


def to_dict(cfg: Config) -> dict:
    """The fully resolved config as plain YAML-able data."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf: what MLflow stores as params."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def loss_keys(name: str) -> tuple[str, ...]:
    """The loss.* fields method ``name`` has (its Settings' fields, in order); () for an unregistered name."""
    return tuple(METHODS[name].Settings.model_fields) if name in METHODS else ()


def own_loss_keys(name: str) -> tuple[str, ...]:
    """The loss.* settings of method ``name`` beyond its temperature (psm_*, mochi_*, tau_plus, beta ...),
    without the keys it reads only for diagnostics (n_hard outside SSCL); () for an unregistered name."""
    if name not in METHODS:
        return ()
    skip = {"name", "temperature", *METHODS[name].Settings.DIAGNOSTIC_KEYS}
    return tuple(k for k in loss_keys(name) if k not in skip)


# stamped into every checkpoint's config as "config_format" (what its names mean; checkpoint.FORMAT, where it
# exists, is the file's layout); absent: 1. 2 (2026-12-04): loss.psm_variant=release is the release's L_hard as it
# runs (the pair mean), no longer the per-anchor mean (now release_rowwise)
CONFIG_FORMAT = 2


def upgrade(data: dict) -> dict:
    """A stored config (checkpoint, MLflow) in today's shape: drop loss.* keys its method does not have.

    Before ``loss`` was a union per method, every method's keys were stored; they had no effect on the run.
    The "config_format" stamp is removed, and the method maps names whose meaning changed since (upgrade_stored).
    """
    stored_format = int(data.get("config_format", 1))
    data = {k: v for k, v in data.items() if k != "config_format"}
    loss = data.get("loss")
    if not isinstance(loss, dict) or loss.get("name", DEFAULT_METHOD) not in METHODS:
        return data
    settings = METHODS[loss.get("name", DEFAULT_METHOD)].Settings
    own = {k: v for k, v in loss.items() if k in settings.model_fields}
    return data | {"loss": settings.upgrade_stored(own, stored_format)}
