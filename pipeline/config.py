"""YAML config -> validated, frozen config, with dotted ``--set`` overrides.

Errors name the YAML path, the bad value, and the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import BadInputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which model to differentiate."""

    source: Literal["builder", "keras_file"] = Field("builder", description="`builder`: a built-in model; `keras_file`: a saved `.keras` file")
    builder: Optional[str] = Field("digits_vgg", description="built-in model name: digits_vgg, cifar_vgg, cifar_vgg100, vgg16, mlp_tanh")
    path: Optional[str] = Field(None, description="the `.keras` file when source is `keras_file`")
    weights: Optional[str] = Field(None, description="optional weights file loaded into a built-in model")
    seed: int = Field(0, description="seed of a built-in model's random weights")
    custom_objects: list[str] = Field(default_factory=list, description="custom Keras objects as `module:Name`, for `keras_file`")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "keras_file" and not self.path:
            raise ValueError("model.path is required when model.source is 'keras_file'")
        if self.source == "builder" and not self.builder:
            raise ValueError("model.builder is required when model.source is 'builder'")
        return self


class TargetConfig(_Section):
    """One tensor (`target`, or each entry of `targets`); a glob over layer paths takes every layer it matches."""

    layer: str = Field(..., description="layer name or nested path (`stem/stem_conv`, `mha/query`), or a glob over them (`block5_*`)")
    weight: str = Field("kernel", description="which weight of the layer: `kernel`, `bias`, `depthwise_kernel`, `pointwise_kernel`, `gamma`, `beta`, `embeddings`")


class DataConfig(_Section):
    """The data set the loss is averaged over."""

    source: Literal["synthetic", "npz", "digits", "zarr", "images", "tfrecord"] = Field(
        "digits", description="`synthetic` (seeded normal inputs), `npz` (arrays `x`, `y`), `digits` (scikit-learn's 8x8 digits),"
        " `zarr` (a Zarr group with arrays `x`, `y`), `images` (a folder of class subfolders) or `tfrecord` (a file glob)")
    path: Optional[str] = Field(None, description="npz file, Zarr group (path or fsspec URL), image folder, or TFRecord glob")
    storage_options: Optional[dict[str, Any]] = Field(None, description="fsspec options for a remote Zarr `path`; null: the top-level `storage_options`")
    image_size: Optional[list[int]] = Field(None, description="`[H, W]` images are resized to (images, tfrecord); null: the model's input size")
    preprocess: str = Field("none", description="images, tfrecord: `none` (pixel values 0-255), `scale` (/255) or a `keras.applications` module name, e.g. `vgg16`")
    batch_size: int = Field(64, gt=0, description="examples per batch; batches are reduced in order")
    num_examples: Optional[int] = Field(None, gt=0, description="use the first N examples (synthetic: how many to draw); all when null")
    seed: int = Field(0, description="seed of synthetic data")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source in ("npz", "zarr", "images", "tfrecord") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"data.image_size must be [H, W] with positive sizes, got {self.image_size}")
        if self.preprocess not in ("none", "scale"):
            import keras

            module = getattr(keras.applications, self.preprocess, None)
            if not hasattr(module, "preprocess_input"):
                raise ValueError(f"data.preprocess must be 'none', 'scale' or a keras.applications module name such as 'vgg16', got {self.preprocess!r}")
        return self


class LossConfig(_Section):
    """Per-example loss; L is its mean over the data set."""

    name: Literal["sparse_categorical_crossentropy", "categorical_crossentropy", "mse"] = Field("sparse_categorical_crossentropy", description="loss function")
    from_logits: bool = Field(False, description="model outputs are logits (true) or probabilities (false)")


class ComputeConfig(_Section):
    """How the diagonal is computed."""

    engine: Literal["auto", "exact", "factored", "hutchinson", "monte_carlo"] = Field("auto", description="`auto` picks `factored` when exact for this model, else `exact`; `hutchinson` and `monte_carlo` are stochastic estimates")
    shard_size: int = Field(8, gt=0, description="output channels per shard (= Zarr chunk along the last axis)")
    chunk_size: int = Field(128, gt=0, description="exact engine: Hessian-vector products vectorized per call at most;"
                            " fewer where `memory_gb` needs")
    precision: Literal["float32", "float64"] = Field(
        "float32", description="exact engine: the arithmetic of its Hessian-vector products and gradients; `float64` computes"
        " every layer in float64 from the float32 weights (about 2x the time on CPUs), for models whose float32 forward pass"
        " loses digits (validation then fails by more than rounding)")
    column_chunk: int = Field(16, gt=0, description="factored engine: loss-Hessian factor columns per call (memory bound)")
    memory_gb: float = Field(2.0, gt=0, description="memory one worker's computation may use (tracing and compiling aside):"
                             " the factored pass chunks examples and channels to fit, the exact engine its products per"
                             " call; a plan where one example (factored) or one product over a batch (exact) cannot fit"
                             " is refused before any compute")
    probes: int = Field(64, gt=1, description="hutchinson: number of Rademacher probes")
    samples: int = Field(16, gt=1, description="monte_carlo: sampled loss-Hessian factor columns per example")
    seed: int = Field(0, description="hutchinson and monte_carlo: random seed")
    example_block: Union[int, Literal["auto"]] = Field(
        "auto", description="examples per work unit; `auto` sizes units to about `unit_seconds` from a calibration timed at start (recorded in the store)")
    unit_seconds: float = Field(120.0, gt=0, description="`example_block: auto`: the targeted compute time of one unit")

    @model_validator(mode="after")
    def _positive_block(self):
        if isinstance(self.example_block, int) and self.example_block < 1:
            raise ValueError("compute.example_block must be at least 1 or 'auto'")
        return self


class ClusterConfig(_Section):
    """Where the shards run."""

    address: Optional[str] = Field(None, description="Ray address; null starts a local Ray, `auto` joins the running cluster")
    num_workers: Union[int, Literal["auto"]] = Field(2, description="actors; `auto` = GPUs in the cluster, else CPU slots")
    gpus_per_worker: Union[float, Literal["auto"]] = Field("auto", description="GPUs per actor; `auto` = 1 when the cluster has GPUs, else 0")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs per actor; TensorFlow's thread pools get this many threads")
    max_retries: int = Field(3, ge=0, description="retries of a shard whose actor or node died")
    executor: Literal["ray", "local"] = Field("ray", description="`local` runs shards in this process (no Ray)")

    @model_validator(mode="after")
    def _positive_workers(self):
        if isinstance(self.num_workers, int) and self.num_workers < 1:
            raise ValueError("cluster.num_workers must be at least 1 or 'auto'")
        return self


class ValidationConfig(_Section):
    """Finite-difference check of sampled entries."""

    samples: int = Field(16, ge=0, description="sampled entries (at least one per shard when samples >= shards)")
    rtol: float = Field(1e-3, gt=0, description="pass when |stored - reference| <= rtol * |reference| + atol * (the tensor's largest"
                                                 " sampled |reference|)")
    atol: float = Field(1e-4, ge=0, description="tolerance floor, relative to the tensor's largest sampled reference entry:"
                                                " float32 results through deep networks are good to about 1e-5 to 1e-4 of it")
    step: float = Field(1e-5, gt=0, description="central-difference step h")
    seed: int = Field(0, description="seed of the sampled indices")


class Config(_Section):
    """A hessdiag run."""

    output: str = Field(..., description="path or fsspec URL (`s3://`, `gs://`, `file://`) of the Zarr store")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for `output` (e.g. `endpoint_url`); secrets belong in the environment")
    model: ModelConfig = Field(default_factory=ModelConfig)
    target: Optional[TargetConfig] = Field(None, description="one tensor: the same as `targets` with one entry")
    targets: Union[Literal["all"], list[TargetConfig], None] = Field(
        None, description="`all` (every kernel, bias and normalization weight of every layer the engines can target, in model"
        " order) or a list of `{layer, weight}`")
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _one_target_key(self):
        if (self.target is None) == (self.targets is None):
            raise ValueError("give exactly one of `target` (one tensor) and `targets` (a list, or `all`)")
        return self

    def target_specs(self) -> list[tuple[str, str]] | str:
        """``all``, or the (layer pattern, weight) pairs to differentiate."""
        if self.targets == "all":
            return "all"
        chosen = [self.target] if self.target is not None else self.targets
        return [(t.layer, t.weight) for t in chosen]

    def fingerprint(self) -> str:
        """sha256 of everything that changes the numbers (not where or how they run)."""
        relevant = self.model_dump(include={"model", "target", "targets", "data", "loss", "compute"},
                                   exclude={"data": {"storage_options"}})
        for (section, key), default in ADDED_LATER.items():
            if relevant[section].get(key) == default:
                del relevant[section][key]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


ADDED_LATER = {("compute", "precision"): "float32"}  # at their defaults they leave older stores' fingerprints as they were


def _section_fields(path: tuple) -> list[str]:
    node: type[BaseModel] = Config
    for part in path:
        field = node.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return list(node.model_fields)
        node = annotation
    return list(node.model_fields)


def _describe(error: dict) -> str:
    location = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        valid = _section_fields(error["loc"][:-1])
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{location}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{location}: required key is missing"
    return f"{location}: {error['msg']} (got {error.get('input')!r})"


def parse_config(raw: Any, origin: str = "config") -> Config:
    """Validate a parsed YAML mapping; raise BadInputError listing every problem."""
    if not isinstance(raw, dict):
        raise BadInputError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise BadInputError(f"{origin} is not a valid config:\n  {problems}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"--set {item!r}: expected dotted.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BadInputError(f"--set {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise BadInputError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path} is not valid YAML: {exc}") from None
    return raw if raw is not None else {}


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override and validate a YAML config file."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    return parse_config(raw, origin=str(path))
