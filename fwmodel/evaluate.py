"""`fwmodel eval`: checkpoints' geometry predictions against a dataset's labels, and stages compared.

For each checkpoint, on the samples of a split (chosen as training chooses them:
`fwmodel.data.select_samples` with the run's data config and the requested split), the geometry
branch runs once per sample (`fwmodel.inference.predict`) on the clip's latents at a low noise level
sigma (`noisy = (1 - sigma) z0 + sigma eps`, timestep 1000 sigma, eps seeded by (seed, sample id), so
every checkpoint sees the same noise), without camera conditioning (as `fwmodel reconstruct` runs on
a real clip). Labels are `fwmodel.data.TrainingDataset` items: the model's normalised frame (camera 0
is the world, scene scaled so the mean point distance from camera 0 is 1), so predictions and labels
are in one frame up to the ambiguities each metric aligns away. Metrics are averaged over samples
(a metric a sample cannot give, e.g. cameras that do not move, is left out of that sample's mean).

Metrics (`METRICS`, in this order; fractions are 0..1, angles in degrees, lengths in label units):

    depth_absrel   mean |s d - d*| / d* after per-clip median scale alignment s = med(d*) / med(d)
    depth_delta1   share of pixels with max(s d / d*, d* / s d) < 1.25 (same alignment)
    point_err      mean ||sR p + t - p*|| / mean ||p*|| after a Sim(3) (Umeyama) of predicted points
                   onto the label's; ||p*|| is the distance from camera 0 (the label's scale)
    rra@5 .. @30   share of frame pairs whose relative rotation error is below 5 / 15 / 30 degrees
    rta@5 .. @30   same for the relative translation direction error
    auc@30         VGGT's AUC: mean over thresholds 1..30 degrees of the share of pairs whose
                   max(rotation error, translation error) is below it
    ate            RMSE of camera centres after a Sim(3) of predicted centres onto the label's
    rpe_trans      RMSE of consecutive-frame relative translations (ATE scale applied)
    rpe_rot_deg    mean consecutive-frame relative rotation error, degrees

Lower is better for depth_absrel, point_err, ate, rpe_*; higher for the rest. The maths reuses the
project's one implementation: `fwdata.compare.depth_errors` (AbsRel / delta1), `fwdata.dataset.camera`
(`umeyama`, `trajectory_metrics` for ATE / RPE, `invert_pose`, `rotation_angle_deg`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from fwdata.dataset import camera as cam

#: the metrics of one evaluation, in the order of tables, eval.json and eval.csv
METRICS = ("depth_absrel", "depth_delta1", "point_err", "rra@5", "rra@15", "rra@30", "rta@5", "rta@15", "rta@30",
           "auc@30", "ate", "rpe_trans", "rpe_rot_deg")
#: metrics where a smaller value is better (the others: larger is better)
LOWER_IS_BETTER = ("depth_absrel", "point_err", "ate", "rpe_trans", "rpe_rot_deg")
THRESHOLDS_DEG = (5, 15, 30)
#: at most this many points enter the Sim(3) fit and error of `point_error` (an even stride over them)
MAX_POINTS = 1_000_000
_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")


class EvalError(ValueError):
    """A one-line problem with what `fwmodel eval` was asked to evaluate (checkpoints, split, output)."""


# --------------------------------------------------------------------------- metrics


def median_scale(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Per-clip scale s = median(truth[valid]) / median(pred[valid]) that puts `pred` on the label's scale.

    pred, truth: depth [T, H, W] (any shape), valid: bool of that shape (label valid and > 0).
    """
    return float(np.median(truth[valid]) / np.median(pred[valid]))


def depth_metrics(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """{"depth_absrel", "depth_delta1"} of predicted depth against the label after per-clip median scaling.

    pred, truth: z-depth [T, H, W]; valid: bool [T, H, W], pixels with a label (truth > 0 is required
    too). AbsRel and delta1 are `fwdata.compare.depth_errors` over the valid pixels (fractions).
    """
    from fwdata.compare import depth_errors

    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    valid = np.asarray(valid, bool) & (truth > 0) & np.isfinite(truth) & np.isfinite(pred)
    if not valid.any():
        return {"depth_absrel": math.nan, "depth_delta1": math.nan}
    s = median_scale(pred, truth, valid)
    absrel, delta1 = depth_errors(s * pred[valid], truth[valid])
    return {"depth_absrel": absrel, "depth_delta1": delta1}


def point_error(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> float:
    """Point-map error after Sim(3) alignment: mean ||s R p + t - p*|| / mean ||p*||.

    pred, truth: points [..., 3] (e.g. [T, H, W, 3]) in one world frame each; valid: bool [...] (pixels
    with a label). (s, R, t) is `fwdata.dataset.camera.umeyama` of the predicted valid points onto the
    label's; the label's scale is the mean distance of its valid points from the world origin (camera 0),
    so 0.1 means errors of a tenth of the scene's size. Beyond `MAX_POINTS` valid points an even stride
    of them is used. NaN when fewer than 3 points are valid or a point set is degenerate.
    """
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    valid = np.asarray(valid, bool) & np.isfinite(pred).all(-1) & np.isfinite(truth).all(-1)
    p, q = pred[valid], truth[valid]
    if len(p) > MAX_POINTS:
        keep = np.linspace(0, len(p) - 1, MAX_POINTS).astype(np.int64)
        p, q = p[keep], q[keep]
    try:
        s, R, t = cam.umeyama(p, q, with_scale=True)
    except ValueError:
        return math.nan
    err = np.linalg.norm(s * p @ R.T + t - q, axis=1)
    return float(err.mean() / np.linalg.norm(q, axis=1).mean())


def pair_errors(pred_w2c: np.ndarray, truth_w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative rotation and translation-direction errors (degrees) over all frame pairs i < j.

    pred_w2c, truth_w2c: [T, 4, 4] w2c. The relative motion of a pair is `w2c_i @ inv(w2c_j)` (camera j
    in camera i's frame, as `camera.trajectory_metrics` uses; independent of the world frame). Rotation
    error: angle of `R_rel* ^T R_rel`; translation error: angle between the two relative translations'
    directions, sign-agnostic (min(a, 180 - a), VGGT), 90 where one of them is zero. Returns two
    arrays [T (T - 1) / 2], pairs in the order (0,1), (0,2), ..., (1,2), ...
    """
    pred_w2c, truth_w2c = np.asarray(pred_w2c, np.float64), np.asarray(truth_w2c, np.float64)
    i, j = np.triu_indices(len(pred_w2c), k=1)
    rel = pred_w2c[i] @ cam.invert_pose(pred_w2c[j])
    rel_gt = truth_w2c[i] @ cam.invert_pose(truth_w2c[j])
    rot = cam.rotation_angle_deg(np.swapaxes(rel_gt[:, :3, :3], -1, -2) @ rel[:, :3, :3])
    a, b = rel[:, :3, 3], rel_gt[:, :3, 3]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, np.abs(np.sum(a * b, axis=1)) / norms, 0.0)
    trans = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
    return rot, trans


def pose_auc(rot_err: np.ndarray, trans_err: np.ndarray, max_threshold: int = 30) -> float:
    """VGGT's AUC@max_threshold of per-pair errors (degrees): the mean over thresholds 1, 2, ..., max of the
    share of pairs with max(rotation, translation error) below it (a histogram of the maxima in
    1-degree bins, its cumulative sum averaged; `vggt/evaluation`'s `calculate_auc_np`)."""
    worst = np.maximum(np.asarray(rot_err, np.float64), np.asarray(trans_err, np.float64))
    histogram, _ = np.histogram(worst, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(histogram / len(worst))))


def camera_metrics(pred_w2c: np.ndarray, truth_w2c: np.ndarray) -> dict[str, float]:
    """RRA / RTA at `THRESHOLDS_DEG` and AUC@30 over all frame pairs (fractions) of `pair_errors`.

    pred_w2c, truth_w2c: [T, 4, 4] w2c, T >= 2.
    """
    rot, trans = pair_errors(pred_w2c, truth_w2c)
    out = {f"rra@{k}": float(np.mean(rot < k)) for k in THRESHOLDS_DEG}
    out.update({f"rta@{k}": float(np.mean(trans < k)) for k in THRESHOLDS_DEG})
    out["auc@30"] = pose_auc(rot, trans, 30)
    return out


def trajectory_errors(pred_w2c: np.ndarray, truth_w2c: np.ndarray) -> dict[str, float]:
    """{"ate", "rpe_trans", "rpe_rot_deg"} of `fwdata.dataset.camera.trajectory_metrics` (Sim(3) on the
    camera centres, label units), NaN where it cannot be computed (T < 3, cameras that do not move)."""
    try:
        m = cam.trajectory_metrics(pred_w2c, truth_w2c)
    except ValueError:
        return {"ate": math.nan, "rpe_trans": math.nan, "rpe_rot_deg": math.nan}
    return {"ate": m["ate"], "rpe_trans": m["rpe_trans"], "rpe_rot_deg": m["rpe_rot_deg"]}


def sample_metrics(pred: dict, label: dict) -> dict[str, float]:
    """Every metric of one clip: `pred` and `label` hold numpy arrays depth [T, H, W], points
    [T, H, W, 3], w2c [T, 4, 4]; `label` also depth_valid, points_valid [T, H, W] and pose_valid [T]."""
    out = depth_metrics(pred["depth"], label["depth"], label["depth_valid"])
    out["point_err"] = point_error(pred["points"], label["points"], label["points_valid"])
    ok = np.asarray(label["pose_valid"], bool)
    if ok.sum() >= 2:
        out.update(camera_metrics(pred["w2c"][ok], label["w2c"][ok]))
    out.update(trajectory_errors(pred["w2c"][ok], label["w2c"][ok]))
    return {k: float(out.get(k, math.nan)) for k in METRICS}


def mean_metrics(per_sample: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the samples that have it (NaN when none has)."""
    out = {}
    for k in METRICS:
        values = [m[k] for m in per_sample if math.isfinite(m[k])]
        out[k] = float(np.mean(values)) if values else math.nan
    return out


# --------------------------------------------------------------------------- running


@dataclass
class EvalOptions:
    checkpoints: list[Path]  # step-N.safetensors files, or run folders (every step-N.safetensors in them)
    data: Path  # the dataset (metadata.json)
    split: str = "val"  # train, val, test or all
    max_samples: Optional[int] = None
    noise: float = 0.05  # sigma of the flow-matching noise on the latents (timestep = 1000 sigma)
    seed: int = 0
    device: str = "auto"
    wan_weights: Optional[str] = None


@dataclass
class EvalResult:
    """One row per checkpoint: {"checkpoint", "stage", "step", <metric>: float, ...}."""

    rows: list[dict]
    data: str
    split: str
    num_samples: int
    metrics: tuple[str, ...] = METRICS
    sample_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The content of eval.json (NaN written as null)."""
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                for r in self.rows]
        return {"rows": rows, "metrics": list(self.metrics), "data": self.data, "split": self.split,
                "num_samples": self.num_samples}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["checkpoint", "stage", "step", *self.metrics])


def step_of(path: Path) -> Optional[int]:
    """N of a step-N.safetensors file name, else None."""
    m = _STEP_FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def expand_checkpoints(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder -> its step-N.safetensors in step order. Raises EvalError for a folder
    without any (a missing file is left to the checkpoint checks, which name it)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if step_of(f) is not None), key=step_of)
            if not found:
                raise EvalError(f"no step-N.safetensors checkpoint in {p}: give a checkpoint file or a run folder "
                                "that `fwmodel train` wrote")
            out += found
        else:
            out.append(p)
    if not out:
        raise EvalError("no checkpoint given: pass --checkpoint FILE or --checkpoint RUN_DIR")
    return out


def noisy_latents(latents: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """Flow-matching forward process at one sigma: (1 - sigma) z0 + sigma eps, eps ~ N(0, 1) from `seed`.

    latents [16, S, Hl, Wl] -> same shape; the same seed gives the same noise on every machine.
    """
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(latents.shape, generator=g)
    return (1.0 - sigma) * latents.float() + sigma * eps


def _selection_config(loaded, opts: EvalOptions):
    """The run's data config on the evaluated dataset and split (and --max-samples)."""
    cfg = loaded.config.data.model_copy(deep=True)
    cfg.root = Path(opts.data)
    cfg.split = opts.split
    cfg.max_samples = opts.max_samples
    return cfg


def eval_dataset(loaded, opts: EvalOptions):
    """The TrainingDataset of the evaluated samples, with the latent cache when it covers them (else None:
    the clips are encoded online), and the encoders for the online case (else None)."""
    from fwdata.dataset.contract import ContractError, load_metadata
    from fwdata.textout import plural
    from fwmodel.cache import CacheError, LatentCache
    from fwmodel.config import get_preset
    from fwmodel.data import DataError, TrainingDataset, select_samples
    from fwmodel.i2v import is_i2v
    from fwmodel.inference import load_encoders

    cfg = _selection_config(loaded, opts)
    try:
        records = select_samples(cfg.root, cfg).records
    except DataError as err:
        try:
            meta = load_metadata(cfg.root)
        except ContractError:
            raise err from None  # the dataset itself is unreadable: select_samples said why
        in_split = [r for r in meta.samples if opts.split in ("all", r.split)]
        raise EvalError(f"nothing to evaluate: no usable sample in split {opts.split!r} of {opts.data} "
                        f"({plural(len(in_split), 'sample')} in that split, {plural(len(meta.samples), 'sample')} in "
                        "the dataset; a sample needs status ok and enough frames for the run's clip); choose another "
                        "--split (val, test, train, all)") from None
    preset = get_preset(loaded.config.model.preset)
    text_dim, i2v = preset.wan.text_dim, is_i2v(preset)
    cache = None
    if cfg.cache != "off":
        try:
            cache = LatentCache.find(cfg)
            if cache is not None:
                cache.check_covers(records, text_dim)
                if i2v:  # an image-to-video model also needs the cached first-frame condition and image tokens
                    cache.check_i2v(records, preset.wan.image_dim)
        except CacheError:
            cache = None
    dataset = TrainingDataset(cfg, text_dim=text_dim, cache=cache)
    encoders = None if cache is not None else load_encoders(loaded)
    if encoders is not None and i2v:
        encoders = (*encoders, eval_image_encoder(loaded, preset))
    return dataset, encoders


def eval_image_encoder(loaded, preset):
    """The CLIP image encoder of an I2V checkpoint evaluated without a latent cache: the run's
    `model.image_encoder`, else the one its latent cache recorded (EvalError when neither is known)."""
    from fwmodel.i2v import ImageEncoderError, load_image_encoder
    from fwmodel.inference import _cache_encoder

    path = getattr(loaded.config.model, "image_encoder", None) or _cache_encoder(loaded.config, "image_encoder")
    if path is None:
        raise EvalError(f"checkpoint {loaded.path} is an image-to-video model ({preset.name}) and the dataset has no "
                        "latent cache with its first-frame condition: cache it with `fwmodel cache DATASET ... "
                        "--image-encoder PATH` or set model.image_encoder in the run's config")
    try:
        return load_image_encoder(str(path), loaded.device, torch.float32, preset)
    except ImageEncoderError as err:
        raise EvalError(str(err)) from None


def evaluate_checkpoint(path: Path, opts: EvalOptions, progress: Optional[Callable[[str], None]] = None):
    """(row of `EvalResult`, sample ids) for one checkpoint."""
    from fwmodel.data import mix_seed
    from fwmodel.inference import load_model, predict

    loaded = load_model(path, wan_weights=opts.wan_weights, device=opts.device)
    dataset, encoders = eval_dataset(loaded, opts)
    per_sample, ids = [], []
    for index, record in enumerate(dataset.records):
        item = dataset[(index, mix_seed(opts.seed, record.id, 1))]
        condition = image_embeds = None  # image-to-video models: the sample's first-frame condition (fwmodel.i2v)
        if encoders is not None:
            latents = encoders[0](item["video"][None])[0].cpu()
            text = encoders[1]([item["text"]])[0].cpu()
            if len(encoders) == 3:
                from fwmodel.cache import encode_i2v
                from fwmodel.i2v import with_mask

                part = encode_i2v(item["video"][None], encoders[0], encoders[2])
                condition, image_embeds = with_mask(part["condition_latents"]), part["image_embeds"]
        else:
            latents, text = item["latents"], item["text"]
            if "condition" in item:
                condition, image_embeds = item["condition"][None], item["image_embeds"][None]
        noisy = noisy_latents(latents, opts.noise, mix_seed(opts.seed, record.id, 2))
        out = predict(loaded, noisy[None], text[None], torch.tensor([1000.0 * opts.noise]),
                      condition=condition, image_embeds=image_embeds)
        pred = {"depth": out.depth[0].cpu().numpy(), "points": out.points[0].cpu().numpy(),
                "w2c": out.w2c[0].cpu().double().numpy()}
        if pred["depth"].shape != tuple(item["depth"].shape):
            raise EvalError(f"checkpoint {path} predicts depth of shape {pred['depth'].shape}, the labels are "
                            f"{tuple(item['depth'].shape)}")
        label = {k: item[k].numpy() for k in ("depth", "depth_valid", "points", "points_valid", "pose_valid")}
        label["w2c"] = item["w2c"].double().numpy()
        per_sample.append(sample_metrics(pred, label))
        ids.append(record.id)
        if progress is not None:
            progress(f"{path}: sample {index + 1}/{len(dataset.records)}")
    row = {"checkpoint": str(path), "stage": loaded.stage, "step": int(loaded.step if loaded.step is not None
                                                                       else (step_of(path) or 0))}
    row.update(mean_metrics(per_sample))
    return row, ids


def evaluate(opts: EvalOptions, progress: Optional[Callable[[str], None]] = None) -> EvalResult:
    """Every checkpoint of `opts` (folders expanded) on the split's samples: one row each, in the order given."""
    if opts.split not in ("train", "val", "test", "all"):
        raise EvalError(f"--split {opts.split!r}: choose val, test, train or all")
    if opts.max_samples is not None and opts.max_samples < 1:
        raise EvalError(f"--max-samples {opts.max_samples}: give a positive number")
    if not 0.0 <= opts.noise < 1.0:
        raise EvalError(f"--noise {opts.noise}: give a sigma in [0, 1), e.g. 0.05")
    rows, counts, ids = [], [], []
    for path in expand_checkpoints(opts.checkpoints):
        row, sample_ids = evaluate_checkpoint(path, opts, progress)
        rows.append(row)
        counts.append(len(sample_ids))
        ids = ids or sample_ids
    return EvalResult(rows, str(opts.data), opts.split, counts[0], sample_ids=ids)


# --------------------------------------------------------------------------- output


def checkpoint_labels(paths: Sequence[str]) -> list[str]:
    """Short unique names for a table: the file stem when all are in one folder, else folder/stem (the
    whole paths when even those repeat)."""
    ps = [Path(p) for p in paths]
    labels = [p.stem for p in ps] if len({p.parent for p in ps}) == 1 else [f"{p.parent.name}/{p.stem}" for p in ps]
    return labels if len(set(labels)) == len(labels) else [str(p) for p in ps]


#: (metric, header) of the two tables, most important first
DEPTH_TABLE = (("depth_absrel", "absrel"), ("depth_delta1", "delta1"), ("point_err", "points"), ("ate", "ATE"),
               ("rpe_trans", "RPEt"), ("rpe_rot_deg", "RPEdeg"))
CAMERA_TABLE = (("auc@30", "AUC@30"), ("rra@5", "RRA@5"), ("rra@15", "RRA@15"), ("rra@30", "RRA@30"),
                ("rta@5", "RTA@5"), ("rta@15", "RTA@15"), ("rta@30", "RTA@30"))
LEGEND = ("absrel depth AbsRel and delta1 share within 1.25x (median-scaled), points point-map error / scene "
          "scale (Sim(3)), ATE / RPEt in scene units, RPEdeg degrees (Sim(3)); RRA / RTA share of frame pairs with "
          "rotation / translation direction error below N degrees, AUC@30 VGGT's pose AUC")


def print_table(result: EvalResult, console) -> None:
    """The checkpoints side by side (one row each) in two tables fitted to the console's width."""
    from rich.markup import escape

    from fwdata.compare_text import number
    from fwdata.textout import fitted_table

    labels = checkpoint_labels([r["checkpoint"] for r in result.rows])
    left_out = []
    for title, spec in ((f"depth, points, trajectory ({result.split}, {result.num_samples} samples)", DEPTH_TABLE),
                        ("cameras over frame pairs", CAMERA_TABLE)):
        cols = [("checkpoint", labels), ("stage", [str(r["stage"]) for r in result.rows]),
                ("step", [str(r["step"]) for r in result.rows])]
        if spec is CAMERA_TABLE:
            del cols[1]  # the stage is in the first table: room for one more metric
        cols += [(h, [number(r[m]) for r in result.rows]) for m, h in spec]
        table, out = fitted_table(cols, console.width, required=len(cols) - len(spec), title=escape(title),
                                  title_justify="left")
        console.print(table)
        left_out += out
    console.print(LEGEND, highlight=False, style="dim")
    if left_out:
        console.print(f"not shown: {', '.join(left_out)}; --format csv or --out DIR has every metric", highlight=False)


def plot_metrics(result: EvalResult, path: Path) -> Path:
    """metrics_vs_step.png: one panel per metric against the step, one line per run folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for r in result.rows:
        runs.setdefault(str(Path(r["checkpoint"]).parent), []).append(r)
    ncols = 4
    nrows = math.ceil(len(result.metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, result.metrics):
        for run, rows in runs.items():
            rows = sorted(rows, key=lambda r: r["step"])
            stages = sorted({r["stage"] for r in rows})
            label = f"{Path(run).name or run} (stage {'/'.join(map(str, stages))})"
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(result.metrics):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower right", fontsize=8)
    fig.suptitle(f"fwmodel eval on {result.data} (split {result.split}, {result.num_samples} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return path


def write_outputs(result: EvalResult, out: Path) -> list[Path]:
    """eval.json, eval.csv and metrics_vs_step.png in `out` (created). Returns the paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"cannot write to {out}: {err.strerror or err}") from None
    paths = [out / "eval.json", out / "eval.csv", out / "metrics_vs_step.png"]
    paths[0].write_text(result.to_json() + "\n")
    result.dataframe().to_csv(paths[1], index=False)
    plot_metrics(result, paths[2])
    return paths
