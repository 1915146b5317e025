"""The pipeline's config tree: one pydantic model per stage, validated once at the edge.

A recipe (YAML) plus ``--set key=value`` overrides resolve into a ``PipelineConfig``; each stage
receives only its own sub-model. Every field says what it is for; ranges are constraints;
cross-field rules are validators whose message names the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShiftConfig(_Strict):
    corruptions: list[Literal["gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast", "gaussian_blur",
                              "fog", "pixelate", "inverted"]] = Field(
        ["gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast", "gaussian_blur", "fog", "pixelate",
         "inverted"], min_length=1,
        description="Corruptions of the test images, each an extra split; inverted (1 - x) is a negative control with one level.")
    severities: list[Literal[1, 2, 3, 4, 5]] = Field([1, 2, 3, 4, 5], min_length=1, description="Severities 1-5 of every corruption but inverted.")
    rows: int = Field(2000, ge=4, description="Test rows corrupted per split (the first ones of the test split).")
    seed: int = Field(0, description="Seed of the random corruptions (noise, fog).")

    @field_validator("severities")
    @classmethod
    def _severities(cls, v):
        return sorted(set(v))


BUILTIN_CLASSES = 10  # fashion_mnist and digits


class DataConfig(_Strict):
    source: Literal["fashion_mnist", "digits", "parquet"] = Field(
        "fashion_mnist", description="Where rows come from: Fashion-MNIST IDX files, scikit-learn's digits, or a Parquet directory.")
    path: Optional[str] = Field(
        None, description="fashion_mnist: directory with the four IDX .gz files (default: Debian's); parquet: directory with train/ and test/ Parquet.")
    features_column: str = Field("features", description="parquet source: the list<float> column holding one row's features.")
    features_columns: Optional[list[str]] = Field(
        None, min_length=1,
        description="parquet source, a wide table: the numeric columns, in this order, that form a row's features. "
                    "Unset: features_column if the table has it, else every numeric column except the label.")
    label_column: str = Field("label", description="parquet source: the integer class-label column.")
    image_shape: Optional[tuple[int, int, int]] = Field(
        None, description="parquet source: (channels, height, width) if features are flattened images; enables per-channel statistics and the CNN.")
    num_classes: Optional[int] = Field(
        None, ge=2, description="parquet source: number of classes; labels lie in [0, num_classes) and every class appears "
                                "in train. Unset: max label + 1 of the train labels. fashion_mnist and digits have 10.")
    class_names: Optional[list[str]] = Field(
        None, description="A name per class, in label order, for plots and per-class metrics. Unset: Fashion-MNIST's "
                          "and digits' own names, the label numbers for a parquet source.")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the training rows held out as the validation split.")
    max_train_rows: Optional[int] = Field(None, ge=10, description="Keep only this many training rows (before the val split); for quick runs and tests.")
    max_test_rows: Optional[int] = Field(None, ge=1, description="Keep only this many test rows; for quick runs and tests.")
    shift: Optional[ShiftConfig] = Field(
        None, description="Add corrupted copies of the test images as splits shift-<corruption>-<severity> (image data only), "
                          "normalized with the clean train statistics; evaluate reports accuracy on each.")


    @model_validator(mode="after")
    def _builtin_class_count(self):
        if self.source != "parquet" and self.num_classes not in (None, BUILTIN_CLASSES):
            raise ValueError(f"data.num_classes={self.num_classes}: the {self.source} source has {BUILTIN_CLASSES} classes; "
                             "remove data.num_classes")
        return self

    @model_validator(mode="after")
    def _one_name_per_class(self):
        # A parquet source without data.num_classes learns its count from the labels: tasks/source.py checks the names then.
        k = self.num_classes or (BUILTIN_CLASSES if self.source != "parquet" else None)
        if self.class_names is not None and k is not None and len(self.class_names) != k:
            raise ValueError(f"data.class_names has {len(self.class_names)} names for data.num_classes={k}; "
                             "give one name per class, in label order")
        return self


class NormalizeConfig(_Strict):
    method: Literal["standard", "minmax", "none"] = Field(
        "standard", description="standard: z-score with the population std; minmax: scale to [0, 1]; none: pass through.")
    per: Literal["feature", "channel"] = Field(
        "channel", description="Statistics per feature column, or per image channel (falls back to feature for tabular data).")
    nonfinite: Literal["error", "drop"] = Field(
        "error", description="What to do with rows holding NaN or +-inf features: fail, or drop and count them.")


_LR = "Base learning rate (for the global batch)."
_WD = "L2 weight decay (not applied to BatchNorm and bias parameters)."


class SGDConfig(_Strict):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.05, gt=0.0, description=_LR)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum (beta of the velocity average); 0 for plain SGD.")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description=_WD)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("train.optimizer.nesterov=true needs train.optimizer.momentum > 0; set a momentum such as 0.9")
        return self


class AdamConfig(_Strict):
    name: Literal["adam"]
    lr: float = Field(1e-3, gt=0.0, description=_LR)
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Decay of the first-moment (gradient) average.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Decay of the second-moment (squared gradient) average.")
    eps: float = Field(1e-8, gt=0.0, description="Denominator guard.")
    weight_decay: float = Field(0.0, ge=0.0, description=_WD)


class RMSpropConfig(_Strict):
    name: Literal["rmsprop"]
    lr: float = Field(1e-3, gt=0.0, description=_LR)
    alpha: float = Field(0.99, ge=0.0, lt=1.0, description="Decay of the squared-gradient average.")
    eps: float = Field(1e-8, gt=0.0, description="Denominator guard.")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="Momentum on top of RMSprop; 0 (none) unless asked.")
    weight_decay: float = Field(0.0, ge=0.0, description=_WD)


class AdagradConfig(_Strict):
    name: Literal["adagrad"]
    lr: float = Field(1e-2, gt=0.0, description=_LR)
    eps: float = Field(1e-10, gt=0.0, description="Denominator guard.")
    weight_decay: float = Field(0.0, ge=0.0, description=_WD)


class AdadeltaConfig(_Strict):
    name: Literal["adadelta"]
    lr: float = Field(1.0, gt=0.0, description="Multiplier of the Adadelta step (1.0 is the paper's method).")
    rho: float = Field(0.9, ge=0.0, lt=1.0, description="Decay of the squared-gradient and update averages.")
    eps: float = Field(1e-6, gt=0.0, description="Denominator guard.")
    weight_decay: float = Field(0.0, ge=0.0, description=_WD)


OptimizerConfig = Annotated[
    Union[SGDConfig, AdamConfig, RMSpropConfig, AdagradConfig, AdadeltaConfig], Field(discriminator="name")]
OPTIMIZERS = {"sgd": SGDConfig, "adam": AdamConfig, "rmsprop": RMSpropConfig, "adagrad": AdagradConfig,
              "adadelta": AdadeltaConfig}


class LRScheduleConfig(_Strict):
    kind: Literal["constant", "step", "exponential", "cosine"] = Field("cosine", description="Learning-rate decay, applied per epoch.")
    step_size: int = Field(5, ge=1, description="step: epochs between decays.")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step/exponential: multiplicative decay factor.")
    min_lr: float = Field(
        0.0, ge=0.0, description="cosine: the rate the schedule reaches after the last epoch (the last epoch still trains above it); below the optimizer's lr.")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs before the schedule starts.")


class ModelConfig(_Strict):
    """The network: a built-in by name (``kind``) or the user's by import path (``class_path``)."""

    kind: Optional[Literal["mlp", "lenet", "resnet"]] = Field(
        None, description="A built-in network: mlp (Linear-BN-ReLU blocks), lenet (LeNet-5-style CNN), resnet (the "
                          "CIFAR-style 6n+2 ResNet of He et al. 2016); the CNNs need image data. Unset: lenet, unless "
                          "class_path names a network.")
    class_path: Optional[str] = Field(
        None, description="Your network by import path, 'package.module:Name' (a class or a function returning an "
                          "nn.Module, e.g. torchvision.models:resnet18). bnflow passes num_classes, and in_channels, "
                          "in_features or input_shape where its signature names them; the rest comes from init_args.")
    init_args: dict[str, Any] = Field(
        default_factory=dict, description="class_path: keyword arguments of the class or function (JSON values).")
    hidden: tuple[int, ...] = Field((256, 128), description="mlp: widths of the hidden layers.")
    depth: int = Field(20, ge=8, description="resnet: layers, 6n+2 (20, 32, 44, 56, 110).")
    width: int = Field(16, ge=1, description="resnet: channels of the first of its three stages (doubled at each next one).")
    init: Optional[Literal["xavier", "kaiming", "lecun", "none"]] = Field(
        None, description="Weight init of conv/linear layers: Xavier/Glorot, Kaiming/He, normal scaled by 1/sqrt(fan_in) "
                          "(LeCun), or none (the network's own). Unset: kaiming for a built-in, none for class_path.")
    weights: Optional[str] = Field(
        None, min_length=1,
        description="Warm start: a state dict or bnflow checkpoint file (a path or a URI pyarrow.fs reads, e.g. s3://...), "
                    "or a logged bnflow model (runs:/RUN_ID/model_recalibrated, models:/NAME@champion). Loaded with "
                    "weights_only=True; every tensor must fit the network.")
    bn: Literal["train", "freeze_stats", "freeze"] = Field(
        "train", description="BatchNorm while training: train (batch statistics, running averages updated); freeze_stats "
                             "(running statistics used and kept; gamma/beta still learn); freeze (statistics and gamma/beta "
                             "fixed). Frozen layers are not synchronized and not recalibrated unless "
                             "recalibrate.include_frozen.")
    bn_momentum: Optional[float] = Field(0.1, gt=0.0, le=1.0, description="Built-ins: BatchNorm running-average momentum; null for the cumulative average.")
    bn_eps: float = Field(1e-5, gt=0.0, description="Built-ins: BatchNorm epsilon guarding the division by the std.")

    @model_validator(mode="after")
    def _one_network(self):
        if self.kind is not None and self.class_path is not None:
            raise ValueError(f"train.model.kind={self.kind} and train.model.class_path={self.class_path} both name a network; "
                             "keep one")
        if self.class_path is None and self.init_args:
            raise ValueError("train.model.init_args is set without train.model.class_path; the built-ins take "
                             "train.model.hidden/depth/width instead")
        if self.class_path is not None and ":" not in self.class_path:
            raise ValueError(f"train.model.class_path={self.class_path!r} must be 'package.module:Name', e.g. "
                             "'torchvision.models:resnet18'")
        return self

    @model_validator(mode="after")
    def _builtin_shapes(self):
        if self.network == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"train.model.hidden={list(self.hidden)} must list at least one positive width, e.g. [256, 128]")
        if self.network == "resnet" and (self.depth - 2) % 6:
            raise ValueError(f"train.model.depth={self.depth}: a CIFAR-style ResNet has 6n+2 layers; use 20, 32, 44, 56 or 110")
        return self

    @property
    def network(self) -> str:
        """The built-in's name, or ``class_path``."""
        return self.class_path or self.kind or "lenet"

    @property
    def init_scheme(self) -> str:
        return self.init or ("none" if self.class_path else "kaiming")


class EarlyStoppingConfig(_Strict):
    """When training stops before train.epochs (tasks/convergence.py); both rules off by default."""

    patience: Optional[int] = Field(
        None, ge=1, description="Stop when the val loss has not improved by more than min_delta for this many val "
                                "evaluations; the trained checkpoint then holds the best epoch's weights. null: off.")
    min_delta: float = Field(0.0, ge=0.0, description="Improvement of the val loss that counts (absolute).")
    train_window: Optional[int] = Field(
        None, ge=1, description="Stop when the train loss changed by less than train_min_change over this many epochs. null: off.")
    train_min_change: float = Field(1e-3, gt=0.0, description="Relative change of the train loss below which it counts as converged.")


class GradHealthConfig(_Strict):
    """Flags on the per-layer gradient norms logged every epoch (tasks/convergence.py)."""

    vanishing_ratio: float = Field(1e-3, gt=0.0, description="Flag vanishing gradients when the first weight layer's norm "
                                                             "over the last one's falls below this.")
    exploding_norm: float = Field(1e3, gt=0.0, description="Flag exploding gradients when a step's global gradient norm exceeds this.")


class TrainConfig(_Strict):
    workers: int = Field(2, ge=1, description="Ray Train workers (one DDP process each).")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved by each worker; torch uses this many threads.")
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL backend; SyncBatchNorm delegates to torch's).")
    bn: Optional[Literal["sync", "local"]] = Field(
        None, description="BatchNorm across workers: sync (statistics of the global batch) or local (per-worker batch). Default: sync when workers > 1.")
    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    batch_size: int = Field(128, ge=1, description="Per-worker mini-batch size; the global batch is workers x batch_size.")
    shuffle_buffer_rows: int = Field(
        32768, ge=1, description="Rows each worker's shuffle buffer holds while it streams its shard (tasks/stream.py): "
                                 "memory is this x a row's bytes; at or above the shard's rows, a full shuffle of it.")
    optimizer: OptimizerConfig = Field(
        default_factory=SGDConfig,
        description="Optimizer (name: sgd, adam, rmsprop, adagrad, adadelta) and only its own hyperparameters. "
                    "--set train.optimizer.name=X that changes the recipe's optimizer starts the section afresh from X's defaults.")
    schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig, description="Learning-rate schedule.")
    grad_clip_norm: Optional[float] = Field(None, gt=0.0, description="Clip the global gradient norm to this value; null to disable.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Network architecture and initialization.")
    eval_every: int = Field(1, ge=1, description="Compute val loss/accuracy every this many epochs.")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig, description="Stopping before train.epochs.")
    grad_health: GradHealthConfig = Field(default_factory=GradHealthConfig, description="Gradient-norm flags.")
    max_failures: int = Field(
        2, ge=-1, description="Restart the worker group from the last epoch checkpoint after this many worker failures (Ray Train FailureConfig; -1: no limit).")

    @model_validator(mode="after")
    def _batch_for_bn(self):
        if self.batch_size < 2:
            raise ValueError(
                f"train.batch_size={self.batch_size}: BatchNorm in training needs at least 2 rows per worker batch; set train.batch_size >= 2")
        return self

    @model_validator(mode="after")
    def _min_lr_below_lr(self):
        if self.schedule.kind == "cosine" and self.schedule.min_lr >= self.optimizer.lr:
            raise ValueError(
                f"train.schedule.min_lr={self.schedule.min_lr} must be below train.optimizer.lr={self.optimizer.lr}; "
                "lower train.schedule.min_lr")
        return self

    @property
    def bn_mode(self) -> str:
        return self.bn or ("sync" if self.workers > 1 else "local")


class RecalibrateConfig(_Strict):
    estimator: Literal["exact", "ema", "batch_mean"] = Field(
        "exact", description="exact: each BN layer's input mean and unbiased variance over every calibration row, pooled "
                             "over the stage's tasks in float64 (PreciseBN); ema: keep the running averages training left; "
                             "batch_mean: the mean over mini-batches of each batch's mean and variance (the course formula).")
    split: str = Field(
        "train", min_length=1,
        description="Split whose rows re-estimate the statistics: train (PreciseBN), val, or a shifted split "
                    "shift-<corruption>-<severity> of data.shift (AdaBN on that target; its labels are never read).")
    rows: Optional[int] = Field(
        None, ge=2, description="Calibration rows, a seeded random sample of the split; unset: 10,000, or the whole split "
                                "when smaller. More than the split holds is an error.")
    batch_size: int = Field(256, ge=2, description="Mini-batch size of the calibration forward passes.")
    include_frozen: bool = Field(
        False, description="Re-estimate BN layers frozen in training too (train.model.bn=freeze_stats/freeze, or "
                           "affine parameters without gradients); by default they keep the statistics they came with.")


class CurvesConfig(_Strict):
    """Thresholds of the loss-curve reading (tasks/curves.py); shares are relative to the curve's value."""

    window: int = Field(3, ge=1, description="Points (epochs, val evaluations) over which a curve's recent trend is read.")
    flat: float = Field(0.01, ge=0.0, description="A curve is flat when it fell by at most this share over the window.")
    overfit_rise: float = Field(0.1, gt=0.0, description="Overfitting when the val loss ends this share above its minimum.")
    overfit_gap: float = Field(2.0, gt=1.0, description="Overfitting when, both curves flat, the final val loss exceeds this multiple of the final train loss.")
    diverge_rise: float = Field(
        0.5, gt=0.0, description="Diverging when the train loss ends above its minimum by this share of the larger of the "
                                 "minimum and the drop from the first epoch to it.")
    data_gap: float = Field(0.5, gt=0.0, lt=1.0, description="Data problem when the final val loss is below this fraction of the final train loss.")


class EvaluateConfig(_Strict):
    batch_size: int = Field(1024, ge=1, description="Inference batch size (does not affect results: BN uses running statistics).")
    adapt_batch_size: int = Field(256, ge=2, description="Batch size of the BN re-estimation on each shifted split (data.shift).")
    top_k: int = Field(5, ge=1, description="k of the top-k accuracy (capped at the number of classes).")
    curves: CurvesConfig = Field(default_factory=CurvesConfig, description="How the train/val loss curves are read.")


class GateConfig(_Strict):
    """When a registered model becomes the champion (pipeline/tracking/registry.py)."""

    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="Test accuracy the candidate must reach at least.")
    min_improvement: float = Field(
        0.0, ge=-1.0, le=1.0, description="Test accuracy the candidate must gain over the current champion, both scored "
                                          "now on this run's test rows; 0: at least as good.")


class TrackingConfig(_Strict):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else a sqlite store in the working directory.")
    experiment: str = Field("bnflow", min_length=1, description="MLflow experiment name.")
    register_model: Optional[str] = Field(
        None, min_length=1, description="Register the recalibrated model under this name in the MLflow model registry; "
                                        "the alias 'champion' moves to it when it passes tracking.gate.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The champion gate of a registered model.")


class SearchConfig(_Strict):
    """Hyperparameter search (``python -m pipeline search``; pipeline/search/): random trials of
    the train stage on Ray Tune, successive halving of the bad ones, coarse-to-fine rounds."""

    space: dict[str, str] = Field(
        default_factory=dict,
        description="Dotted train.* field -> distribution: loguniform(low, high), uniform(low, high), int(low, high), "
                    "one_minus_loguniform(low, high) for beta-like fields, choice([a, b, ...]).")
    trials: int = Field(16, ge=1, description="Trials over all rounds (split evenly, the first rounds taking the rest).")
    rounds: int = Field(1, ge=1, description="Coarse-to-fine rounds: each next one samples a space narrowed around the best trials so far.")
    epochs: Optional[int] = Field(None, ge=1, description="Epochs per trial at most (its budget); default: train.epochs.")
    grace_epochs: int = Field(1, ge=1, description="Epochs every trial runs before successive halving may stop it (ASHA grace period).")
    reduction_factor: int = Field(
        3, ge=2, description="ASHA: at each rung (grace x factor^k epochs) only the best 1/factor of the trials go on; "
                             "a large value (e.g. 1000) stops none early.")
    parallel: Optional[int] = Field(
        None, ge=1, description="Trials at once; default and cap: as many as the cluster's CPUs hold (each trial: its "
                                "train.workers x train.cpus_per_worker).")
    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="Per-epoch metric that ranks trials.")
    mode: Optional[Literal["max", "min"]] = Field(None, description="Better is max or min; default: max for accuracy, min for loss.")
    keep: float = Field(0.25, gt=0.0, le=1.0, description="Share of the best trials a next round narrows around (at least two).")
    margin: float = Field(0.25, ge=0.0, description="A narrowed range is the kept trials' span widened by this share of it on each side.")
    seed: int = Field(0, description="Seed of the sampled configurations: the same seed samples the same trials.")

    @property
    def direction(self) -> str:
        return self.mode or ("max" if self.metric == "val_accuracy" else "min")


class PipelineConfig(_Strict):
    name: str = Field("run", min_length=1, description="Recipe name, used in run names.")
    seed: int = Field(0, description="Seed for the splits, initialization and shuffling.")
    storage: str = Field("runs", description="Directory (shared by all nodes) where stages write their outputs.")
    reuse: tuple[Literal["ingest", "normalize"], ...] = Field(
        ("ingest", "normalize"),
        description="Stages whose complete outputs from an earlier run in the same storage are reused (hard-linked) when their config, seed, source and input digests are identical; [] to always recompute.")
    data: DataConfig = Field(default_factory=DataConfig, description="Ingest stage.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Normalize stage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Train stage.")
    recalibrate: RecalibrateConfig = Field(default_factory=RecalibrateConfig, description="Recalibrate stage.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluate stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Hyperparameter search (python -m pipeline search only).")

    @model_validator(mode="after")
    def _model_fits_data(self):
        net = self.train.model.network
        if net in ("lenet", "resnet") and self.data.source == "parquet" and self.data.image_shape is None:
            raise ValueError(f"train.model.kind={net} needs image data: set data.image_shape (e.g. [1, 28, 28]) or train.model.kind=mlp")
        return self


def config_hash(model: BaseModel) -> str:
    """Stable short hash of a (sub-)config: identifies what produced an artifact."""
    blob = json.dumps(model.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(model: BaseModel, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value strings, for MLflow params."""
    out: dict[str, str] = {}
    for key, value in model.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out, key, value):
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

