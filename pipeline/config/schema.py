"""The typed configuration's schema: one pydantic model per section, and `Config` holding them all.

Every setting lives here once, with its default, range and meaning; `jobs/configs/default.yaml` lists them all.
Validation checks everything that can be checked without touching the cluster, so a bad value fails with one line
naming the key, the value and what is allowed. Model facts (names, inits, input sizes) come from the model table,
`pipeline.architectures`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import storage
from pipeline.architectures import ARCHITECTURES, MODEL_NAMES

# data.max_image_pixels: ILSVRC2012's largest photos are camera originals of about 12-15 MP (4288x2848, a few near
# 5000x3000); 40 MP leaves more than twice that and caps one decode at ~120 MB of RGB (160 MB in PIL, which keeps
# 4 bytes a pixel) in a loader process, where a 140 KB PNG declaring 12000x12000 would take gigabytes. The ceiling
# is PIL's own Image.MAX_IMAGE_PIXELS: above it PIL warns at open (and refuses above twice it), so a larger limit
# could not take effect without changing PIL's process-wide setting.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Every model.init any model takes; which model takes which is checked per model (ModelConfig).
INITS = tuple(init for entry in ARCHITECTURES.values() for init in entry.inits)


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str = Field(
        "data/shards",
        description="holds train/, val/, test/ shard splits: a local or NFS path, "
        "or a URL (s3://, gs://, any fsspec protocol)",
    )
    shard_command: str | None = Field(
        None,
        description="command streaming {url} to stdout, e.g. 'aws s3 cp {url} -' "
        "(run as an argument vector, no shell); null: open local paths directly, URLs "
        "via fsspec",
    )
    shard_url_schemes: list[str] = Field(
        default_factory=list,
        description="URL schemes a manifest may list shards "
        "under (e.g. [s3, gs]); empty: shard entries must be plain file names",
    )
    train_image_size: int = Field(224, ge=16, le=1024, description="RandomResizedCrop output side, pixels")
    eval_image_size: int = Field(224, ge=16, le=1024, description="centre-crop side for val/test, pixels")
    eval_crop_ratio: float = Field(0.875, gt=0.0, le=1.0, description="crop side / resize side (224/256)")
    min_crop_scale: float = Field(0.08, gt=0.0, le=1.0, description="RandomResizedCrop smallest area share")
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        le=PIL_MAX_IMAGE_PIXELS,
        description="largest width x height decoded (loader, verify, predict, sheets); "
        "an image declaring more is refused from its header, as a corrupt sample",
    )
    # 0.001: ImageNet's train set holds a few dozen odd files in 1.28 M (converted or skipped by `shard`); more than
    # one in a thousand masked in an epoch means unreadable shards, and then the epoch's numbers are not the data's.
    max_corrupt_fraction: float = Field(
        0.001,
        ge=0.0,
        le=1.0,
        description="stop when an epoch's masked (corrupt or unreadable) share of train or val samples exceeds this",
    )
    loader_workers: int = Field(2, ge=0, le=64, description="DataLoader processes per training worker")
    shuffle_buffer: int = Field(1000, ge=1, description="samples held for the in-worker shuffle")
    prefetch_batches: int = Field(2, ge=1, description="batches prefetched per DataLoader process")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu",
        description="where JPEGs are decoded: cpu (DataLoader "
        "processes) or gpu (nvJPEG in the training process; needs "
        "scaling.use_gpu)",
    )
    fit_splits: list[Literal["train", "val"]] = Field(
        ["train"], description="splits trained on: [train], or [train, val] for a refit (then nothing is validated)"
    )

    @field_validator("fit_splits")
    @classmethod
    def _train_first(cls, value: list[str]) -> list[str]:
        if value not in (["train"], ["train", "val"]):
            raise ValueError("choose [train] (train, validate on val) or [train, val] (a refit: no validation)")
        return value

    @property
    def validates(self) -> bool:
        """A refit trains on val as well, so it has no split left to validate on."""
        return "val" not in self.fit_splits

    @field_validator("root", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value  # callers may pass a Path

    @field_validator("root")
    @classmethod
    def _readable_root(cls, value: str) -> str:
        if storage.is_url(value):
            storage.check_readable_protocol(value)  # a missing s3fs fails here, not in every worker later
        return value

    @field_validator("shard_url_schemes")
    @classmethod
    def _plain_schemes(cls, value: list[str]) -> list[str]:
        for scheme in value:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or scheme == "pipe":
                raise ValueError(f"{scheme!r} is not a URL scheme such as s3 or gs (and pipe: is never allowed)")
        return value

    @field_validator("shard_command")
    @classmethod
    def _command_names_the_shard(cls, value: str | None) -> str | None:
        if value is not None:
            storage.check_shard_command(value)
        return value


class ModelConfig(_Section):
    name: Literal[MODEL_NAMES] = "resnet18"  # type: ignore[valid-type]
    num_classes: int | None = Field(None, ge=2, description="None: from the shard manifest; else must match it")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="AlexNet FC dropout / ResNet pre-classifier dropout")
    local_response_norm: bool = Field(True, description="AlexNet only: LRN after conv1 and conv2 as in 2012")
    init: Literal[INITS] | None = Field(  # type: ignore[valid-type]
        None,
        description="AlexNets only; None: the model's own. alexnet: paper (N(0, 0.01), biases 1) or reference "
        "(Caffe's bvlc_alexnet: fc6/fc7 N(0, 0.005), biases 0.1); alexnet_tv: torchvision (PyTorch's layer "
        "defaults) or kaiming (He et al. 2015 for convs, N(0, 0.01) for FC: torchvision's VGG init)",
    )

    @model_validator(mode="after")
    def _init_fits_the_model(self) -> "ModelConfig":
        allowed = ARCHITECTURES[self.name].inits
        if self.init is not None and self.init not in allowed:
            takes = f"takes {' or '.join(allowed)}" if allowed else "has no init choice"
            raise ValueError(f"model.init = {self.init!r} does not apply to {self.name}, which {takes}")
        return self


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=10.0, description="SGD: per 256 images, scaled with the global batch")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0, lt=1.0, description="not applied to BatchNorm and bias")
    batch_size: int = Field(256, ge=1, description="global batch: summed over all training workers")
    epochs: int = Field(90, ge=1)
    schedule: Literal["cosine", "step", "plateau"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_epochs: int = Field(30, ge=1, description="step schedule: divide lr by step_gamma every this many epochs")
    step_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step and plateau schedules: lr multiplier")
    # 3: ImageNet val top-1 moves by ~0.1-0.2 points between epochs at a constant rate, so one or two flat
    # epochs are noise; the 2012 run divided 3 times in ~90 epochs, so waiting 3 epochs wastes little.
    plateau_patience: int = Field(3, ge=1, description="plateau: divide lr after this many epochs without val gain")
    min_lr: float = Field(0.0, ge=0.0, description="plateau: lr floor, in optim.lr's units (SGD: per 256 images)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip_norm: float | None = Field(None, gt=0.0)
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without val improvement")

    @model_validator(mode="after")
    def _check_plateau(self) -> "OptimConfig":
        if self.schedule != "plateau":
            return self
        if self.warmup_epochs:
            raise ValueError(f"optim.warmup_epochs = {self.warmup_epochs}: the plateau schedule has no warmup; use 0")
        if self.step_gamma >= 1.0:
            raise ValueError(f"optim.step_gamma = {self.step_gamma}: the plateau schedule needs a multiplier below 1")
        if self.min_lr >= self.lr:
            raise ValueError(f"optim.min_lr = {self.min_lr} is not below optim.lr = {self.lr}: lr could never drop")
        if self.patience is not None and self.patience <= self.plateau_patience:
            raise ValueError(
                f"optim.patience = {self.patience} must exceed optim.plateau_patience = "
                f"{self.plateau_patience}: the run would stop before the lr is divided"
            )
        return self


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=0, description="Ray Train workers; 0 runs in-process (local mode)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(1.0, gt=0.0)
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    compile: bool = False
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the latest checkpoint")

    @property
    def world_size(self) -> int:
        return max(1, self.num_workers)


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else SQLite in the project")
    experiment: str = "imagenet"
    run_name: str | None = Field(None, description="also the Ray Train run name: same name resumes")

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, value: str | None) -> str | None:
        # It becomes a folder name on checkpoint storage and a quoted value in MLflow filter strings.
        if value is not None and not RUN_NAME.fullmatch(value):
            raise ValueError("use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value

    storage_path: str = Field("ray_results", description="checkpoints: a local path, NFS, s3:// or gs:// URI")
    registered_model: str = "imagenet-classifier"
    min_champion_top1: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="val top-1 (%) a version must exceed to become champion; None: twice chance (200 / classes)",
    )
    keep_checkpoints: int = Field(2, ge=1, description="best checkpoints kept by val top-1, plus the latest")
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="also checkpoint every N steps within an "
        "epoch, so a killed run resumes at its next step; None: at epoch "
        "ends only",
    )
    allow_changed_resume: bool = Field(
        False,
        description="resume a run although its data (manifest hash) or "
        "optimisation settings changed since its checkpoints were written",
    )
    knn_every: int | None = Field(
        None,
        ge=1,
        description="log val k-NN top-1 (train gallery) every N epochs; "
        "None: never (it costs an extra pass over train)",
    )
    log_every_n_steps: int | None = Field(
        None,
        ge=0,
        description="log train loss, lr and images/s every N steps "
        "within an epoch; None: about 100 points per epoch; 0: per epoch only",
    )


class RetrievalConfig(_Section):
    output: str = Field(
        "embeddings", description="embed writes <output>/<model>-v<version>/<split> here (local or a shared volume)"
    )
    embed_workers: int = Field(2, ge=1, description="Ray Data model replicas (actors) embedding in parallel")
    embed_batch_size: int = Field(64, ge=1, description="images per forward pass in each replica")
    decode_cpus: float = Field(1.0, gt=0.0, description="CPUs per Ray Data decoding task")
    index: Literal["flat", "ivf", "hnsw"] = Field(
        "flat", description="flat: exact; ivf, hnsw: approximate, for galleries of ImageNet-train size"
    )
    ivf_nlist: int | None = Field(
        None, ge=1, description="ivf clusters; None: 4 * sqrt(gallery size), at most size / 39"
    )
    ivf_nprobe: int = Field(16, ge=1)
    hnsw_m: int = Field(32, ge=2)
    knn_k: int = Field(20, ge=1, description="neighbours voting in k-NN classification")
    knn_temperature: float = Field(0.07, gt=0.0, description="k-NN vote weight exp(similarity / T)")


class SearchSpaceParam(_Section):
    kind: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> "SearchSpaceParam":
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a 'choice' parameter needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a '{self.kind}' parameter needs low < high (got low={self.low}, high={self.high})")
            if self.kind == "loguniform" and self.low <= 0:
                raise ValueError(f"a 'loguniform' parameter needs low > 0 (got {self.low})")
        return self


class SearchConfig(_Section):
    space: dict[str, SearchSpaceParam] = Field(default_factory=dict, description="dotted config key -> range")
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    algorithm: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0)
    max_trial_failures: int = Field(1, ge=0)
    seed: int = 0


class Config(_Section):
    seed: int = Field(0, ge=0, lt=2**32, description="numpy and the data plan take seeds in [0, 2**32)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _check_input_size(self) -> "Config":
        smallest = ARCHITECTURES[self.model.name].min_image_size
        for key in ("train_image_size", "eval_image_size"):
            if getattr(self.data, key) < smallest:
                raise ValueError(
                    f"data.{key} = {getattr(self.data, key)}: {self.model.name} needs inputs of at "
                    f"least {smallest} px (its strides and pools leave no map below that)"
                )
        return self

    @model_validator(mode="after")
    def _check_decode(self) -> "Config":
        if self.data.decode == "gpu" and not self.scaling.use_gpu:
            raise ValueError(
                "data.decode = 'gpu' decodes JPEGs on the training workers' GPUs, and scaling.use_gpu "
                "is false; set scaling.use_gpu: true on a GPU cluster, or data.decode: cpu"
            )
        return self

    @model_validator(mode="after")
    def _check_refit(self) -> "Config":
        if self.data.validates:
            return self
        needs_val = {
            "optim.schedule": self.optim.schedule if self.optim.schedule == "plateau" else None,
            "optim.patience": self.optim.patience,
            "tracking.knn_every": self.tracking.knn_every,
        }
        for key, value in needs_val.items():
            if value is not None:
                raise ValueError(
                    f"{key} = {value!r} needs a val split, and data.fit_splits = {self.data.fit_splits} "
                    "trains on val (a refit); use the cosine or step schedule, no patience, no knn_every"
                )
        return self

    @model_validator(mode="after")
    def _check_batch_divides(self) -> "Config":
        world = self.scaling.world_size
        if self.optim.batch_size % world:
            raise ValueError(
                f"optim.batch_size = {self.optim.batch_size} is not divisible by scaling.num_workers = {world}; "
                "the batch is global, choose a multiple of the worker count"
            )
        return self

    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.batch_size // self.scaling.world_size

    def with_absolute_paths(self) -> "Config":
        """Relative paths mean 'from the current directory'; Ray workers run elsewhere, so pin them here."""
        data = self.data.model_copy(update={"root": storage.absolute(self.data.root)})
        tracking = self.tracking.model_copy(update={"storage_path": storage.absolute(self.tracking.storage_path)})
        retrieval = self.retrieval.model_copy(update={"output": storage.absolute(self.retrieval.output)})
        return self.model_copy(update={"data": data, "tracking": tracking, "retrieval": retrieval})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
