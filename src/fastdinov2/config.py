"""One typed configuration schema for fastdinov2.

The schema is a tree of dataclasses loaded through OmegaConf structured configs, so YAML presets and
DINOv2-style ``key=value`` overrides are type-checked and unknown keys are rejected by name. Values
that are well-typed but impossible (a crop not divisible by the patch size, stage lengths that do not
add up, ...) are rejected by :func:`validate` with the dotted key of the offending field.

Presets live in ``configs/<name>.yaml`` and are named by their file stem.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "vit_custom")
LOWPASS_METHODS = ("resize", "fourier", "jpeg_draft")
NOISE_KINDS = ("none", "gaussian", "blur")
CENTERINGS = ("softmax", "sinkhorn_knopp")
SWITCH_MODES = ("continuous", "restart")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("halt", "skip")
STRATEGIES = ("ddp", "fsdp2")
COMPILE_MODES = ("none", "modules", "blocks", "step")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "cudagraphs", "aot_eager")
FFN_LAYERS = ("auto", "mlp", "swiglu")
# The trainer seeds numpy with ``train.seed * 1000 + rank`` (train/loop.py), which must fit numpy's 32-bit seed
# (<= 2**32 - 1) for every rank up to 999.
MAX_SEED = (2**32 - 1000) // 1000


_MISSING = object()


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible. The message names the key."""


@dataclass
class StudentConfig:
    """The backbone. ``arch`` picks a width/depth; ``vit_custom`` takes ``embed_dim``/``depth``/``num_heads``."""

    arch: str = "vit_small"
    patch_size: int = 16
    embed_dim: int = 384  # used by vit_custom only
    depth: int = 12  # used by vit_custom only
    num_heads: int = 6  # used by vit_custom only
    mlp_ratio: float = 4.0
    ffn_layer: str = "auto"  # "auto": SwiGLU for vit_giant2 (as the official weights), MLP otherwise
    num_register_tokens: int = 0
    layerscale: float | None = 1.0e-5  # LayerScale init; null disables LayerScale
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    pretrained: str | None = None  # a backbone file (ours, official DINOv2, seed) to start from
    head_warmup_epochs: float = 0.0  # continued pre-training: train only the heads for this many epochs


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    koleo_loss_weight: float = 0.1
    centering: str = "softmax"
    # true: the DINO cross-entropy of every (student crop, teacher crop) pair as Triton row kernels on CUDA over
    # the [rows, K] class-token logits in the heads' dtype (no fp32 [rows, K] tensor; losses/fused.py); other
    # devices, or no Triton: the reference path (with a warning). "auto": true on CUDA with Triton. Default false
    # until it is measured on a GPU (docs/benchmarks.md, item 16).
    fused_loss: str = "false"


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    # "batch": DINOv2's masking per micro-batch (exactly int(2B * mask_sample_probability) global crops masked,
    # ratios stratified over [min, max]); "sample": each crop on its own (data/masking.py)
    mask_sampling: str = "batch"
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    # > 0: iBOT loss fused with the prototype layer, this many masked-token rows per chunk (no [M, K]
    # logits; losses/chunked.py). 0: the reference path. Ignored (reference path) with Sinkhorn-Knopp.
    loss_chunk_rows: int = 0
    # true: the iBOT cross-entropy and its centre statistic as Triton row kernels on CUDA over the [M, K] logits
    # in the heads' dtype (no fp32 [M, K] tensor; losses/fused.py). Other devices, or no Triton: reference path
    # (with a warning). "auto" (default): true on CUDA with Triton, softmax centring and loss_chunk_rows=0 (on
    # an H100 it took a ViT-S/16 graph step at 224/96 from 74.2 to 63.5 ms), else false, silently.
    fused_loss: str = "auto"


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30.0


@dataclass
class OptimConfig:
    epochs: int = 100
    base_lr: float = 0.004  # per `lr_reference_batch` images, scaled by the rule below
    lr_reference_batch: int = 1024
    scaling_rule: str = "sqrt"  # "sqrt" | "linear" | "none"
    min_lr: float = 1.0e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    """DINOv2 multi-crop geometry at full resolution. Stages may shrink the output sizes."""

    global_crops_scale_min: float = 0.32
    global_crops_scale_max: float = 1.0
    local_crops_scale_min: float = 0.05
    local_crops_scale_max: float = 0.32
    local_crops_number: int = 8
    global_crops_size: int = 224
    local_crops_size: int = 96


@dataclass
class NoiseConfig:
    """Gaussian noise patching (FastDINOv2): additive N(0,1)*U(0,max_scale) noise on a random square."""

    kind: str = "none"  # "none" | "gaussian" | "blur"
    p: float = 1.0
    max_scale: float = 0.5  # gaussian: sigma ~ U(0, max_scale) on [0, 1] pixel values
    blur_sigma_min: float = 0.1  # blur: sigma ~ U(min, max) in pixels
    blur_sigma_max: float = 2.0


@dataclass
class StageConfig:
    """One stage of the frequency curriculum.

    Its length is either ``epochs`` or ``fraction`` (of ``optim.epochs``); exactly one is set, and
    the stages' lengths add up to ``optim.epochs``.
    """

    name: str = "full"
    epochs: float | None = None
    fraction: float | None = None
    global_size: int = 224
    local_size: int = 96
    lowpass: str = "resize"
    batch_size_per_gpu: int | None = None
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass
class CurriculumConfig:
    switch_mode: str = "continuous"  # "continuous" | "restart"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(fraction=1.0)])


@dataclass
class DataConfig:
    root: str | None = None  # None: the embedded synthetic dataset
    num_workers: int = 4
    max_bad_samples: int = 0
    # What an allowed bad file gives: "replace": the sample is drawn again from another image (batches keep
    # their size); "drop": the batch shrinks (one process only: ranks would run different collectives)
    on_bad_sample: str = "replace"
    cache_dir: str | None = None  # where the embedded dataset is written; default ~/.cache/fastdinov2
    # "worker": colour ops in the loader workers; "device": batched on the training device (uint8 crops leave
    # the workers); "auto": device on CUDA, worker on the CPU (where batching saves nothing)
    photometric_on: str = "auto"


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps (smoke tests); schedules keep their length
    log_every: int = 10
    checkpoint_every: int = 500
    keep_last_checkpoints: int = 2
    grad_accum_steps: int = 1
    nan_policy: str = "halt"
    max_consecutive_skips: int = 10
    knn_at_end: bool = True
    progress: bool = True


@dataclass
class ComputeConfig:
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile: "none"; "modules" (backbones and heads, in place); "blocks" (each transformer block and head
    # in place, one compilation per shape serving all blocks, plus the loss terms); "step" (teacher targets
    # + student + losses as one function, backward by AOTAutograd). true/false mean "modules"/"none".
    # See docs/benchmarks.md.
    compile: str = "none"
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", "max-autotune-no-cudagraphs"
    compile_mode: str = "default"
    # torch.compile backend: "inductor" (generated kernels; compile_mode applies), "cudagraphs" (no code
    # generation: the captured forward and backward replayed as CUDA graphs, seconds to compile; CUDA only),
    # "aot_eager" (the captured graphs run eagerly: for debugging)
    compile_backend: str = "inductor"
    # Pad each batch's masked-token rows to a multiple of this (weight-0 rows), so compiled code / CUDA graphs
    # see a few shapes per stage instead of one per batch (with ibot.mask_sampling=batch, padded to at least the
    # batch masking's upper bound, DINOv2's `upperbound`: one shape per stage); 0 = no padding.
    masked_tokens_bucket: int = 0
    # Capture each training step as one CUDA graph per batch shape and replay it (one launch per step instead
    # of thousands; schedules are read from the device). CUDA only (on a CPU the same static step runs eagerly);
    # needs masked_tokens_bucket > 0, softmax centring, no gradient accumulation, no fp16. Under torchrun:
    # strategy=ddp (gradients averaged by one captured all-reduce of a flat buffer) and ibot.mask_sampling=batch.
    # "auto" (default): true on one CUDA device where those hold (masked_tokens_bucket 0 then becomes 64), else
    # false (under torchrun too: set true there), silently; the start-up log says which. On an H100 the graph
    # step of ViT-S/16 at 112/48 took 27 ms, the eager one 74 ms (docs/benchmarks.md).
    cuda_graph: str = "auto"
    # The student's global and local crops go through the transformer blocks as one packed token sequence
    # (attention within each crop; DINOv2 does this with a block-diagonal mask): one pass instead of two, half
    # the kernels of the student's blocks. false: one pass per crop size.
    pack_crops: bool = True
    # Under autocast (bf16/fp16), keep the ViT's residual stream, LayerNorm outputs and layer-scale products in
    # the autocast dtype instead of fp32, as DINOv2's FSDP mixed precision does (half the bytes of the blocks'
    # elementwise work, no cast before each linear layer); parameters, gradients and losses stay fp32.
    half_residual: bool = False
    # Keep bf16 copies of the student's and teacher's linear/conv weights, refreshed once per step, instead of
    # autocast casting each weight at every use and each gradient back (~400 small kernels per ViT-S step);
    # bf16 only; under torchrun strategy=ddp (flat gradient all-reduce) (train/half_weights.py).
    half_weights: bool = False
    # Queue the teacher's forward (backbone, heads, centring) on a second CUDA stream, so its kernels can run
    # while the student's forward runs on the first: at low resolution many kernels are too small to fill the
    # GPU, and two streams fill the gaps. The same kernels and results; captured as two branches of the CUDA
    # graph with compute.cuda_graph. One process, CUDA only (no effect on a CPU), not with compute.compile=step.
    overlap_teacher: bool = False
    threads: int | None = None  # torch CPU threads; null or 0: automatic (train/loop.py)
    strategy: str = "ddp"  # data parallelism under torchrun: "ddp" | "fsdp2" (shards params; for ViT-L/g)


@dataclass
class Config:
    student: StudentConfig = field(default_factory=StudentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


DEFAULT_PRESET = "fastdinov2_tiny"


def presets_dir() -> Path:
    """The folder holding the shipped presets (inside the wheel, or ``configs/`` of a source tree)."""
    packaged = Path(str(resources.files("fastdinov2"))) / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _resolve_config_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    preset = presets_dir() / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown preset {name_or_path!r}: not a file, and not one of {', '.join(list_presets())}"
        )
    return preset


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry the line
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        key = _full_path(other, key.split(".")) or key
        raise ConfigError(f"{source}: invalid key or value {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}") from exc
    assert isinstance(merged, DictConfig)
    return merged


def _list_hint(merged: DictConfig, key: str) -> str:
    """For ``a.b.N.rest`` past the end of the list ``a.b``: how many entries it has, and how to add one."""
    parts = key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            node = OmegaConf.select(merged, ".".join(parts[:i]), default=None)
            if isinstance(node, ListConfig) and int(part) >= len(node):
                return (f": {'.'.join(parts[:i])} has {len(node)} entries (0-{len(node) - 1}); an override cannot "
                        "add one, give the whole list in a YAML file (base: PRESET)")
    return ""


def _full_path(node: Any, tail: list[str], prefix: str = "") -> str | None:
    """The dotted path in ``node`` (a loaded YAML tree) that ends with the keys ``tail``: OmegaConf names a bad
    key inside a list element relative to the element (``noise.maxscale`` for
    ``curriculum.stages.0.noise.maxscale``)."""
    items: list[tuple[str, Any]]
    if isinstance(node, DictConfig | dict):
        items = [(str(k), node[k]) for k in node]
    elif isinstance(node, ListConfig | list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return None
    want = ".".join(tail)
    for k, v in items:
        path = f"{prefix}.{k}" if prefix else k
        if path == want or path.endswith("." + want):
            return path
        found = _full_path(v, tail, path)
        if found is not None:
            return found
    return None


def load_config(config: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML file plus ``key=value`` overrides.

    A preset may name another with a top-level ``base: NAME`` key; it is applied first. A relative file
    name in ``base`` is found next to the file that names it (else in the current folder).
    """
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    layers: list[tuple[Path, DictConfig]] = []
    name: str | None = config or DEFAULT_PRESET
    while name is not None:
        including = layers[-1][0] if layers else None
        if including is not None and (including.parent / name).is_file():
            name = str(including.parent / name)
        try:
            path = _resolve_config_file(name).resolve()
        except ConfigError as exc:
            if including is None:
                raise
            raise ConfigError(f"config {including}: base: {exc}") from exc
        if any(path == p for p, _ in layers):
            raise ConfigError(f"config {path}: 'base' chain loops back to itself")
        raw = _load_yaml(path)
        name = raw.pop("base", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"config {path}: 'base' must be a preset name or file")
        layers.append((path, raw))
    merged = schema
    for path, raw in reversed(layers):
        merged = _merge(merged, raw, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            parsed = OmegaConf.select(OmegaConf.from_dotlist([f"{key}={value}"]), key)
            if isinstance(parsed, DictConfig | ListConfig):
                parsed = OmegaConf.to_container(parsed)
            if OmegaConf.select(merged, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"override {key}: unknown key {key!r}{_list_hint(merged, key)}")
            if not value.strip():  # YAML reads an empty value as null: KEY="$UNSET" would silently mean KEY=null
                none = ("data.root=null for the embedded synthetic dataset" if key == "data.root"
                        else f"{key}=null where the key takes none")
                raise ConfigError(f"override {key}: the value is empty (an unset shell variable?); "
                                  f"give a value, or {none}")
            OmegaConf.update(merged, key, parsed, merge=True)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"override {key}: invalid key or value {value!r}: {exc}") from exc
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    assert isinstance(cfg, Config)
    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def diff_configs(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (``ignore`` lists prefixes to skip)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(d, dict):
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(d, list):
            for i, v in enumerate(d):
                out.update(flat(v, f"{prefix}{i}."))
        else:
            out[prefix[:-1]] = d
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k.startswith(p) for p in ignore)]


def tristate(value: object, key: str) -> bool | None:
    """An "auto" / true / false option (``compute.cuda_graph``, ``ibot.fused_loss``, ``dino.fused_loss``): ``None``
    for "auto".
    YAML and ``key=value`` booleans arrive as "True"/"False" in the string field; both spellings are taken."""
    v = str(value).lower()
    if v == "auto":
        return None
    if v in ("true", "false"):
        return v == "true"
    raise ConfigError(f"{key}: {value!r} is not one of auto, true, false")


def _tristate_text(value: object, key: str) -> str:
    """``value`` of a :func:`tristate` option as its canonical text: "auto", "true" or "false"."""
    return {None: "auto", True: "true", False: "false"}[tristate(value, key)]


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def _positive(value: float, key: str) -> None:
    _check(value > 0, key, f"must be positive, got {value}")


def _nonnegative(value: float, key: str, note: str = "") -> None:
    _check(value >= 0, key, f"must be >= 0{note}, got {value}")


def _in_unit(value: float, key: str, interval: str = "[0, 1]") -> None:
    """``value`` in ``interval``: "[0, 1]", "[0, 1)" or "(0, 1]"."""
    low = value > 0 if interval.startswith("(") else value >= 0
    high = value < 1 if interval.endswith(")") else value <= 1
    _check(low and high, key, f"must be in {interval}, got {value}")


def _not_blank(value: str | None, key: str, null_means: str) -> None:
    """A path option is null or a non-blank string (a blank one would be the current folder, or be ignored)."""
    _check(value is None or value.strip() != "", key,
           f"is empty ({value!r}); give a path, or {key}=null for {null_means}")


def _check_finite(node: Any, key: str = "") -> None:
    """Every float in the config is finite: ``nan`` and ``inf`` parse as floats, but no option takes them."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, list):
        for n, item in enumerate(node):
            _check_finite(item, f"{key}.{n}")
    elif isinstance(node, float):
        _check(math.isfinite(node), key, f"must be a finite number, got {node}")


def stage_epochs(cfg: Config) -> list[float]:
    """Length of each curriculum stage in epochs (validated to add up to ``optim.epochs``)."""
    out = []
    for st in cfg.curriculum.stages:
        out.append(float(st.epochs) if st.epochs is not None else float(st.fraction or 0.0) * cfg.optim.epochs)
    return out


def cuda_graph_conflicts(cfg: Config) -> list[tuple[str, str]]:
    """What keeps the step from being one CUDA graph, as ``(key, why)`` pairs (none: it can be): errors for an
    explicit ``compute.cuda_graph=true`` (:func:`_check_cuda_graph`), reasons to stay eager for "auto"."""
    c = cfg.compute
    found = [
        (c.compile_backend == "cudagraphs" or c.compile_mode in ("reduce-overhead", "max-autotune"),
         "compute.cuda_graph", f"cannot be combined with torch.compile's own CUDA graphs (compute.compile_backend="
         f"{c.compile_backend!r}, compute.compile_mode={c.compile_mode!r}); use compile_backend=inductor with "
         "compile_mode=default or max-autotune-no-cudagraphs"),
        (cfg.train.grad_accum_steps != 1, "train.grad_accum_steps",
         "must be 1 with compute.cuda_graph=true (the graph holds one micro-batch)"),
        (c.precision == "fp16", "compute.precision",
         "'fp16' cannot be used with compute.cuda_graph=true (its grad scaler reads the device); use 'bf16'"),
        (cfg.dino.centering != "softmax", "dino.centering",
         f"must be 'softmax' with compute.cuda_graph=true, not {cfg.dino.centering!r} (Sinkhorn-Knopp slices the "
         "real masked rows by a per-batch count, a shape no graph can hold)"),
    ]
    return [(key, why) for hit, key, why in found if hit]


def _check_cuda_graph(cfg: Config) -> None:
    """What ``compute.cuda_graph=true`` needs: fixed shapes and no host round trip inside a step."""
    _check(cfg.compute.masked_tokens_bucket > 0, "compute.masked_tokens_bucket",
           "must be > 0 with compute.cuda_graph=true (e.g. 64): batches then fall into a few shapes, one graph each")
    for key, why in cuda_graph_conflicts(cfg):
        raise ConfigError(f"{key}: {why}")


def validate(cfg: Config) -> None:
    """Reject impossible values; each error names the dotted key (and the value)."""
    _check_finite(cfg)
    s = cfg.student
    _choice(s.arch, "student.arch", ARCHS)
    _choice(s.ffn_layer, "student.ffn_layer", FFN_LAYERS)
    _positive(s.patch_size, "student.patch_size")
    _positive(s.embed_dim, "student.embed_dim")
    _positive(s.depth, "student.depth")
    _positive(s.num_heads, "student.num_heads")
    _positive(s.mlp_ratio, "student.mlp_ratio")
    _nonnegative(s.num_register_tokens, "student.num_register_tokens")
    _in_unit(s.drop_path_rate, "student.drop_path_rate", "[0, 1)")
    _not_blank(s.pretrained, "student.pretrained", "no pretrained weights")
    _nonnegative(s.head_warmup_epochs, "student.head_warmup_epochs")
    if s.arch == "vit_custom":
        _check(s.embed_dim % s.num_heads == 0, "student.embed_dim",
               f"{s.embed_dim} is not divisible by student.num_heads={s.num_heads}")
    _choice(cfg.dino.centering, "dino.centering", CENTERINGS)
    _choice(cfg.ibot.mask_sampling, "ibot.mask_sampling", ("batch", "sample"))
    for sec in ("dino", "ibot"):
        head = getattr(cfg, sec)
        _nonnegative(head.loss_weight, f"{sec}.loss_weight", " (0 turns the loss off)")
        _positive(head.head_n_prototypes, f"{sec}.head_n_prototypes")
        _positive(head.head_bottleneck_dim, f"{sec}.head_bottleneck_dim")
        _positive(head.head_hidden_dim, f"{sec}.head_hidden_dim")
        _check(head.head_nlayers >= 1, f"{sec}.head_nlayers", f"must be >= 1, got {head.head_nlayers}")
    _nonnegative(cfg.dino.koleo_loss_weight, "dino.koleo_loss_weight", " (0 turns the KoLeo loss off)")
    i = cfg.ibot
    _in_unit(i.mask_sample_probability, "ibot.mask_sample_probability")
    _in_unit(i.mask_ratio_min, "ibot.mask_ratio_min")
    _in_unit(i.mask_ratio_max, "ibot.mask_ratio_max")
    _check(i.mask_ratio_min <= i.mask_ratio_max, "ibot.mask_ratio_min",
           f"{i.mask_ratio_min} is larger than ibot.mask_ratio_max={i.mask_ratio_max}")
    _nonnegative(i.loss_chunk_rows, "ibot.loss_chunk_rows", " (0: no chunked iBOT loss)")
    cfg.dino.fused_loss = _tristate_text(cfg.dino.fused_loss, "dino.fused_loss")
    i.fused_loss = _tristate_text(i.fused_loss, "ibot.fused_loss")
    if i.fused_loss == "true":
        _check(i.loss_chunk_rows == 0, "ibot.fused_loss", "and ibot.loss_chunk_rows > 0 are two iBOT loss paths: "
               "choose one")
        _check(cfg.dino.centering == "softmax", "ibot.fused_loss", "needs dino.centering=softmax (Sinkhorn-Knopp "
               "targets need all [M, K] teacher logits at once)")
    t = cfg.teacher
    _in_unit(t.momentum_teacher, "teacher.momentum_teacher")
    _check(t.momentum_teacher <= t.final_momentum_teacher <= 1.0, "teacher.final_momentum_teacher",
           f"must be in [teacher.momentum_teacher={t.momentum_teacher}, 1], got {t.final_momentum_teacher}")
    _positive(t.warmup_teacher_temp, "teacher.warmup_teacher_temp")
    _positive(t.teacher_temp, "teacher.teacher_temp")
    _nonnegative(t.warmup_teacher_temp_epochs, "teacher.warmup_teacher_temp_epochs")
    o = cfg.optim
    _positive(o.epochs, "optim.epochs")
    _positive(o.base_lr, "optim.base_lr")
    _positive(o.lr_reference_batch, "optim.lr_reference_batch")
    _choice(o.scaling_rule, "optim.scaling_rule", ("sqrt", "linear", "none"))
    _nonnegative(o.min_lr, "optim.min_lr")
    _check(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs",
           f"must be in [0, optim.epochs={o.epochs}], got {o.warmup_epochs}")
    _nonnegative(o.weight_decay, "optim.weight_decay")
    _nonnegative(o.weight_decay_end, "optim.weight_decay_end")
    _nonnegative(o.clip_grad, "optim.clip_grad", " (0 disables clipping)")
    _in_unit(o.layerwise_decay, "optim.layerwise_decay", "(0, 1]")
    _nonnegative(o.patch_embed_lr_mult, "optim.patch_embed_lr_mult")
    _nonnegative(o.freeze_last_layer_epochs, "optim.freeze_last_layer_epochs", " (0: the last layer is never frozen)")
    _in_unit(o.adamw_beta1, "optim.adamw_beta1", "[0, 1)")
    _in_unit(o.adamw_beta2, "optim.adamw_beta2", "[0, 1)")
    c = cfg.crops
    for kind in ("global", "local"):
        lo, hi = getattr(c, f"{kind}_crops_scale_min"), getattr(c, f"{kind}_crops_scale_max")
        _in_unit(lo, f"crops.{kind}_crops_scale_min", "(0, 1]")
        _in_unit(hi, f"crops.{kind}_crops_scale_max", "(0, 1]")
        _check(lo <= hi, f"crops.{kind}_crops_scale_min", f"{lo} is larger than crops.{kind}_crops_scale_max={hi}")
    _nonnegative(c.local_crops_number, "crops.local_crops_number")
    _check(c.local_crops_size <= c.global_crops_size, "crops.local_crops_size",
           f"{c.local_crops_size} is larger than crops.global_crops_size={c.global_crops_size}")
    for key, size in (("crops.global_crops_size", c.global_crops_size), ("crops.local_crops_size", c.local_crops_size)):
        _check(size > 0 and size % s.patch_size == 0, key,
               f"{size} is not a positive multiple of student.patch_size={s.patch_size}")
    cur = cfg.curriculum
    _choice(cur.switch_mode, "curriculum.switch_mode", SWITCH_MODES)
    _check(len(cur.stages) >= 1, "curriculum.stages", "needs at least one stage")
    for n, st in enumerate(cur.stages):
        k = f"curriculum.stages.{n}"
        _check((st.epochs is None) != (st.fraction is None), f"{k}.epochs",
               "set exactly one of epochs and fraction")
        length = st.epochs if st.epochs is not None else st.fraction
        assert length is not None
        _positive(length, f"{k}.{'epochs' if st.epochs is not None else 'fraction'}")
        for name, size in (("global_size", st.global_size), ("local_size", st.local_size)):
            _check(size > 0 and size % s.patch_size == 0, f"{k}.{name}",
                   f"{size} is not a positive multiple of student.patch_size={s.patch_size}")
        _check(st.local_size <= st.global_size, f"{k}.local_size",
               f"{st.local_size} is larger than the stage's global_size={st.global_size}")
        _check(st.global_size <= c.global_crops_size, f"{k}.global_size",
               f"{st.global_size} is larger than crops.global_crops_size={c.global_crops_size}")
        _check(st.local_size <= c.local_crops_size, f"{k}.local_size",
               f"{st.local_size} is larger than crops.local_crops_size={c.local_crops_size}")
        _choice(st.lowpass, f"{k}.lowpass", LOWPASS_METHODS)
        if st.batch_size_per_gpu is not None:
            _positive(st.batch_size_per_gpu, f"{k}.batch_size_per_gpu")
        _choice(st.noise.kind, f"{k}.noise.kind", NOISE_KINDS)
        _in_unit(st.noise.p, f"{k}.noise.p")
        _nonnegative(st.noise.max_scale, f"{k}.noise.max_scale")
        _positive(st.noise.blur_sigma_min, f"{k}.noise.blur_sigma_min")
        _check(st.noise.blur_sigma_min <= st.noise.blur_sigma_max, f"{k}.noise.blur_sigma_max",
               f"{st.noise.blur_sigma_max} is smaller than blur_sigma_min={st.noise.blur_sigma_min}")
    total = sum(stage_epochs(cfg))
    _check(math.isclose(total, o.epochs, rel_tol=1e-6, abs_tol=1e-6), "curriculum.stages",
           f"stage lengths add up to {total:g} epochs, but optim.epochs={o.epochs}")
    d = cfg.data
    _not_blank(d.root, "data.root", "the embedded synthetic dataset")
    _not_blank(d.cache_dir, "data.cache_dir", "the default cache ($FASTDINOV2_CACHE, else ~/.cache/fastdinov2)")
    _nonnegative(d.num_workers, "data.num_workers")
    _nonnegative(d.max_bad_samples, "data.max_bad_samples")
    _choice(d.on_bad_sample, "data.on_bad_sample", ("replace", "drop"))
    _choice(d.photometric_on, "data.photometric_on", ("auto", "worker", "device"))
    tr = cfg.train
    _positive(tr.batch_size_per_gpu, "train.batch_size_per_gpu")
    if cfg.dino.koleo_loss_weight > 0:  # KoLeo needs a nearest neighbour within each rank's batch
        _check(tr.batch_size_per_gpu >= 2, "train.batch_size_per_gpu",
               f"must be >= 2 when dino.koleo_loss_weight > 0, got {tr.batch_size_per_gpu}")
        for n, st in enumerate(cur.stages):
            _check(st.batch_size_per_gpu is None or st.batch_size_per_gpu >= 2,
                   f"curriculum.stages.{n}.batch_size_per_gpu",
                   f"must be >= 2 when dino.koleo_loss_weight > 0, got {st.batch_size_per_gpu}")
    _check(0 <= tr.seed <= MAX_SEED, "train.seed",
           f"must be in [0, {MAX_SEED}] (numpy's 32-bit seed takes train.seed * 1000 + rank), got {tr.seed}")
    if tr.max_steps is not None:
        _positive(tr.max_steps, "train.max_steps")
    _positive(tr.log_every, "train.log_every")
    _positive(tr.checkpoint_every, "train.checkpoint_every")
    _check(tr.keep_last_checkpoints >= 2, "train.keep_last_checkpoints",
           f"must be >= 2, got {tr.keep_last_checkpoints}")
    _check(tr.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {tr.grad_accum_steps}")
    _choice(tr.nan_policy, "train.nan_policy", NAN_POLICIES)
    _check(tr.max_consecutive_skips >= 1, "train.max_consecutive_skips",
           f"must be >= 1, got {tr.max_consecutive_skips}")
    if cfg.compute.threads is not None:
        _nonnegative(cfg.compute.threads, "compute.threads", " (0 or null: automatic)")
    _choice(cfg.compute.device, "compute.device", DEVICES)
    _choice(cfg.compute.precision, "compute.precision", PRECISIONS)
    _check(not (cfg.compute.half_weights and cfg.compute.precision in ("fp16", "fp32")), "compute.half_weights",
           f"needs bf16 autocast (compute.precision=auto or bf16), got compute.precision={cfg.compute.precision}")
    _choice(cfg.compute.strategy, "compute.strategy", STRATEGIES)
    # compute.compile: the booleans of earlier configs (OmegaConf turns them into "True"/"False") keep working
    cfg.compute.compile = {"true": "modules", "false": "none"}.get(str(cfg.compute.compile).lower(),
                                                                   str(cfg.compute.compile))
    _choice(cfg.compute.compile, "compute.compile", COMPILE_MODES)
    _check(not (cfg.compute.overlap_teacher and cfg.compute.compile == "step"), "compute.overlap_teacher",
           "cannot be combined with compute.compile=step (one compiled function holds both forwards); use "
           "compute.compile=blocks")
    _choice(cfg.compute.compile_mode, "compute.compile_mode", TORCH_COMPILE_MODES)
    _choice(cfg.compute.compile_backend, "compute.compile_backend", COMPILE_BACKENDS)
    if cfg.compute.compile_mode != "default" and cfg.compute.compile_backend != "inductor":
        raise ConfigError(
            f"compute.compile_mode={cfg.compute.compile_mode!r} is an inductor mode; "
            f"compute.compile_backend={cfg.compute.compile_backend!r} takes only 'default'"
        )
    _nonnegative(cfg.compute.masked_tokens_bucket, "compute.masked_tokens_bucket", " (0: no padding)")
    cfg.compute.cuda_graph = _tristate_text(cfg.compute.cuda_graph, "compute.cuda_graph")
    if cfg.compute.cuda_graph == "true":
        _check_cuda_graph(cfg)
    _check(not (cfg.compute.strategy == "fsdp2" and cfg.compute.precision == "fp16"), "compute.precision",
           "'fp16' is not supported with compute.strategy=fsdp2 (its grad scaler would not see other ranks' "
           "shards); use 'bf16' or 'fp32'")
