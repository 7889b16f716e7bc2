"""BrainMoE pipelines: ``pretrain`` (per-state experts + the pooled baseline expert), ``train``
(router + adapter fine-tuning), ``evaluate`` (stratified k-fold: BrainMoE vs pooled expert + MLP / SVM),
``predict``, ``embed`` and ``demo``.

Conventions:

* Data is a cohort folder (its ``manifests/fmri.csv``), a manifest ``.csv``/``.tsv`` or a BIDS folder
  whose rows are scans (``subject``, ``state``, ``timeseries`` or ``bold``, labels). Rows with a
  ``cohort`` of ``pretrain`` (or, without that column, rows lacking the phenotype label) pretrain the
  experts; labelled rows are the downstream task.
* Every scan becomes an FC matrix (``neuromoe.data.connectivity``); the FC kind, Fisher z flag, atlas
  size and (for tangent FC) the reference matrix are stored in each model's ``config.json`` so
  ``predict``/``embed`` replay the same pipeline on new scans.
* Experts are frozen by default; their embeddings are then computed once per scan and cached in memory
  for fine-tuning (the router still chooses which k of them the adapter sees).
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from neuromoe.config import load_family_config, save_config
from neuromoe.engine import TrainConfig, Trainer, finish_training, is_main_process, monitor_problems
from neuromoe.engine.utils import pipeline_entry, resolve_device
from neuromoe.errors import ConfigError, InputError, ModelFormatError
from neuromoe.io.atomic import atomic_path, atomic_write_json, check_outputs, remove_stale, removes_on_error
from neuromoe.io.table import failures_path, file_ids, scan_ids, write_failures
from neuromoe.layers.moe import load_balancing_loss, router_z_loss
from neuromoe.models.brainmoe import (
    BrainMoE,
    BrainMoEOutput,
    Expert,
    JEPAExpert,
    expert_architecture,
    fit_pca,
)

FAMILY = "brainmoe"
POOLED = "pooled"
ROUTER = "router"
EXPERTS_FILE = "experts.json"
_READ_CHUNK = 64  # scans whose ROI series are in memory at once (an HCP rest run: ~1.3 MB at 264 ROIs)

__all__ = [
    "BrainMoEConfig",
    "DataSection",
    "EvalSection",
    "ExpertSection",
    "ModelSection",
    "demo",
    "embed",
    "evaluate",
    "load_brainmoe_config",
    "predict",
    "pretrain",
    "train",
]


@dataclass
class DataSection:
    """Which scans and how they become FC matrices."""

    fc_kind: Literal["pearson", "partial", "tangent"] = "pearson"
    fisher_z: bool = True
    states: list[str] = field(default_factory=list)  # empty = every state of the pretraining scans
    phenotype: str = "phenotype"  # label column of the downstream task


@dataclass
class ExpertSection:
    kind: Literal["fc_mae", "jepa", "state_clf"] = "state_clf"
    preset: Literal["tiny", "demo", "base"] = "demo"
    mask_ratio: float = 0.5  # fc_mae (ROIs) and jepa (windows)
    window: int = 16  # jepa: TRs per token
    n_windows: int = 8  # jepa: tokens per crop (needs window·n_windows TRs)
    ema: float = 0.99  # jepa target encoder
    pooled: bool = True  # also pretrain the all-states expert used by the baselines

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type the chosen expert cannot use, refused before any scan is read."""
        out = []
        if self.kind in ("fc_mae", "jepa") and not 0 < self.mask_ratio < 1:
            out.append(("mask_ratio", f"{self.mask_ratio} is not in (0, 1)", "0.5"))
        if self.kind == "jepa":  # a crop of window·n_windows TRs, some windows masked, the others context
            if self.window < 1:
                out.append(("window", "must be >= 1", "16"))
            if self.n_windows < 2:
                out.append(("n_windows", "must be >= 2", "8"))
            if not 0 <= self.ema <= 1:
                out.append(("ema", f"{self.ema} is not in [0, 1]", "0.99"))
        return out


@dataclass
class ModelSection:
    preset: Literal["tiny", "demo", "base"] = "demo"
    top_k: int = 2
    router_noise: float = 0.5  # noisy top-k in training, so unchosen experts get tried
    router_input: Literal["fc", "pca"] = "fc"  # pca = first router_pca whitened PCs of the training FC
    router_pca: int = 16
    router_prior: bool = False  # pretrain also fits a state router (pca input); fine-tuning starts from it
    router_prior_epochs: int = 50  # the state router is tiny (router_pca inputs): cheap to fit to confidence
    dense_warmup: float = 0.0  # share of fine-tuning epochs routing densely (every expert gets gradient)
    balance_coef: float = 0.0  # Switch load-balancing loss on the router (shared layer)
    dropout: float = 0.1
    unfreeze_experts: bool = False
    expert_lr_scale: float = 1.0  # unfrozen experts' learning rate = train.lr × this (adapt, not re-learn)
    expert_warmup: float = 0.0  # unfrozen experts: share of fine-tuning epochs they stay frozen first
    router_lr_scale: float = 1.0  # router learning rate = train.lr × this (a slower router saturates later)
    z_coef: float = 0.0  # router z-loss (shared layer): keeps router logits small, so routing stays soft
    sex_weight: float = 0.5
    age_weight: float = 0.5  # on the standardised age (MSE)

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type fine-tuning cannot use (top_k above the number of experts is capped there)."""
        out = []
        if self.top_k < 1:
            out.append(("top_k", "must be >= 1 (experts per scan)", "2"))
        if self.router_pca < 1:
            out.append(("router_pca", "must be >= 1", "16"))
        if self.router_prior and self.router_prior_epochs < 1:
            out.append(("router_prior_epochs", "must be >= 1", "50"))
        if not 0 <= self.dropout < 1:
            out.append(("dropout", f"{self.dropout} is not in [0, 1)", "0.1"))
        for name in ("dense_warmup", "expert_warmup"):  # shares of the fine-tuning epochs
            if not 0 <= getattr(self, name) <= 1:
                out.append((name, f"{getattr(self, name)} is not a share in [0, 1]", "0"))
        # a negative loss weight is maximised and a negative learning rate climbs the loss; NaN spoils both
        for name, example in (("router_noise", "0.5"), ("balance_coef", "0"), ("z_coef", "0"), ("sex_weight", "0.5"),
                              ("age_weight", "0.5"), ("expert_lr_scale", "1"), ("router_lr_scale", "1")):
            if not 0 <= getattr(self, name) < float("inf"):
                out.append((name, f"{getattr(self, name)} is not a number >= 0", example))
        return out


@dataclass
class EvalSection:
    folds: int = 5
    svm_c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])
    mlp_hidden: int = 64

    def problems(self) -> list[tuple[str, str, str]]:
        """Values of the right type cross-validation and the baselines cannot use."""
        out = []
        if self.folds < 2:
            out.append(("folds", "must be >= 2 for cross-validation", "5"))
        if not self.svm_c or not all(0 < c < float("inf") for c in self.svm_c):  # the SVMs' C grid
            out.append(("svm_c", f"{list(self.svm_c)} is not a list of positive numbers", "[0.1,1.0]"))
        if self.mlp_hidden < 1:
            out.append(("mlp_hidden", "must be >= 1", "64"))
        return out


@dataclass
class BrainMoEConfig:
    data: DataSection = field(default_factory=DataSection)
    expert: ExpertSection = field(default_factory=ExpertSection)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 0

    def problems(self) -> list[tuple[str, str, str]]:
        """The monitored metric: the experts' and the fine-tuning validation report the loss alone."""
        return monitor_problems(self, {"pretrain": {"val_loss": "min"}, "train": {"val_loss": "min"}})


def load_brainmoe_config(
    preset: str | Path | None = "demo",
    overrides: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> BrainMoEConfig:
    """Preset ← ``--set`` overrides ← ``--seed``/``--device`` (which also reach both train configs)."""
    return load_family_config(BrainMoEConfig, FAMILY, preset, overrides, seed, device)


# --------------------------------------------------------------------------------------------- data


def load_scans(data: str | Path) -> pd.DataFrame:
    """Scan table (one row per run) from a cohort folder, a manifest or a BIDS folder."""
    from neuromoe.data.fmri import fmri_table
    from neuromoe.io.table import cohort_source

    data = cohort_source(data, "fmri")
    table = fmri_table(data)
    if table.empty:
        raise InputError(
            "no fMRI scans found", path=data, fix="point --data at an fMRI manifest or BIDS folder"
        )
    return table.reset_index(drop=True)


def _is_labelled(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[column].fillna("").astype(str).str.strip().ne("").to_numpy()


def pretrain_rows(table: pd.DataFrame, phenotype: str) -> np.ndarray:
    if "cohort" in table.columns and table["cohort"].astype(str).eq("pretrain").any():
        return table["cohort"].astype(str).eq("pretrain").to_numpy()
    return ~_is_labelled(table, phenotype)


@dataclass
class FCSpec:
    """How a time series becomes the model's input; stored in every model's config.json."""

    kind: str
    fisher_z: bool
    n_rois: int
    n_timepoints: int = 0  # jepa crop length (0 = FC only)
    reference: list[list[float]] | None = None  # tangent reference

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _series_cache() -> Any:
    """ROI series extracted from BOLD, cached per file under ``$NEUROMOE_CACHE/timeseries`` (default
    ``~/.cache/neuromoe/preprocess/timeseries``): every command re-extracted every run, ~3 min a run at HCP size."""
    from neuromoe.data.connectivity import FCCache
    from neuromoe.data.preprocess import default_cache_root

    return FCCache(default_cache_root(None) / "timeseries")


def _series_chunks(table: pd.DataFrame) -> Iterator[tuple[slice, pd.DataFrame, list[np.ndarray]]]:
    """The ROI series of ``table``'s scans, ``_READ_CHUNK`` at a time, with their rows (slice and sub-table)."""
    from neuromoe.data.fmri import scan_timeseries

    cache = _series_cache()
    for start in range(0, len(table), _READ_CHUNK):
        part = table.iloc[start : start + _READ_CHUNK]
        yield slice(start, start + len(part)), part, [scan_timeseries(r, cache=cache) for _, r in part.iterrows()]


def _model_inputs(
    table: pd.DataFrame, spec: FCSpec, where: Any, *, covariances: bool = False
) -> dict[str, np.ndarray]:
    """Per scan of ``table``: ``fc`` and, for the JEPA expert, ``ts`` (its centre window), or with ``covariances``
    its Ledoit-Wolf ``cov`` (for the tangent reference). The series are read ``_READ_CHUNK`` scans at a time and
    let go, so a cohort's never sit in memory together (an HCP rest run's, 1,200 TRs × 264 ROIs, hold 4.5× its FC
    matrix). ``spec.n_rois == 0`` is set to the cohort's most common ROI count: a first scan stored ROI × time
    must not set it and blame the good ones."""
    from neuromoe.data.connectivity import covariances as lw_covariances

    provisional = not spec.n_rois
    shapes = np.zeros((len(table), 2), dtype=int)
    out: dict[str, np.ndarray] = {}
    ok = True
    for rows, part, ts in _series_chunks(table):
        shapes[rows] = [x.shape for x in ts]
        spec.n_rois = spec.n_rois or int(Counter(shapes[rows, 1]).most_common(1)[0][0])
        if not (shapes[rows, 1] == spec.n_rois).all():
            if not provisional:
                _check_rois(shapes[rows], spec.n_rois, where, part)
            ok = False  # the cohort's count is known once every shape is read; only shapes are kept now
        if not ok:
            continue
        files = [_scan_file(r) for _, r in part.iterrows()]
        parts = {"cov": lw_covariances(ts, sources=files)} if covariances else {"fc": _fc(ts, spec, files)}
        if spec.n_timepoints and not covariances:
            parts["ts"] = _crop(ts, spec.n_timepoints, where, table=part)
        for key, value in parts.items():
            out.setdefault(key, np.empty((len(table), *value.shape[1:]), value.dtype))[rows] = value
    if not ok:
        _check_rois(shapes, int(Counter(shapes[:, 1]).most_common(1)[0][0]), where, table)
    return out


def _fc(ts: list[np.ndarray], spec: FCSpec, sources: list[str] | None = None) -> np.ndarray:
    from neuromoe.data.connectivity import connectivity

    ref = None if spec.reference is None else np.asarray(spec.reference, dtype=np.float64)
    return np.asarray(
        connectivity(ts, kind=spec.kind, fisher_z=spec.fisher_z, reference=ref, sources=sources),
        dtype=np.float32,
    )


def _check_rois(
    shapes: Sequence[tuple[int, int]] | np.ndarray, n_rois: int, where: Any, table: pd.DataFrame | None = None
) -> None:
    """All scans (their T × M ``shapes``) have ``n_rois`` ROIs; the message names the first offending scan's file
    (from ``table``'s rows, aligned with ``shapes``) or else ``where``."""
    bad = [i for i, (_, m) in enumerate(shapes) if m != n_rois]
    if bad:
        t, m = shapes[bad[0]]
        swapped = t == n_rois
        raise InputError(
            f"scan has {m} ROIs, the model expects {n_rois}"
            + (f" (it has {t} rows: stored ROI × time?)" if swapped else ""),
            path=(_scan_file(table.iloc[bad[0]]) if table is not None else "") or where,
            fix="save T rows × M ROI columns" if swapped else "extract ROI signals with the atlas the model was "
            "trained on",
        )


def _crop(ts: list[np.ndarray], n: int, where: Any, rng: np.random.Generator | None = None,
          table: pd.DataFrame | None = None) -> np.ndarray:
    """(N, n, M): a window of ``n`` TRs per scan (centre, or random with ``rng``), z-scored per ROI; a scan
    too short is named by its file (from ``table``'s rows, aligned with ``ts``) or else ``where``."""
    short = [i for i, x in enumerate(ts) if x.shape[0] < n]
    if short:
        raise InputError(
            f"scan has {ts[short[0]].shape[0]} time points; the JEPA expert needs at least {n}",
            path=(_scan_file(table.iloc[short[0]]) if table is not None else "") or where,
            fix="use longer runs or lower expert.window/expert.n_windows",
        )
    out = []
    for x in ts:
        start = (x.shape[0] - n) // 2 if rng is None else int(rng.integers(0, x.shape[0] - n + 1))
        w = x[start : start + n].astype(np.float32)
        out.append((w - w.mean(0)) / (w.std(0) + 1e-6))
    return np.stack(out)


class ScanSet(Dataset):
    """In-memory tensors per scan: ``fc`` (M, M), optional ``ts``/``emb``/labels; indexable subsets."""

    # items draw no random numbers, so the Trainer skips its per-item RNG reseeding (8 s of the demo's 62k items)
    random_items = False

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def subset(self, rows: np.ndarray) -> ScanSet:
        idx = torch.as_tensor(np.flatnonzero(rows) if rows.dtype == bool else rows, dtype=torch.long)
        return ScanSet({k: v[idx] for k, v in self.tensors.items()})


# ------------------------------------------------------------------------------------------ pretrain


class ExpertTrainer(Trainer):
    """Pretraining of one expert (``fit_best`` keeps the best-validation weights)."""

    def training_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self.model.loss(batch["fc"], batch.get("ts"), batch.get("target"))

    def on_optimizer_step(self) -> None:
        if isinstance(self.model, JEPAExpert):  # one EMA step per optimiser step, not per micro-batch
            self.model.update_target()

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        # the same masks every validation, without resetting the RNG the training steps draw from
        with torch.random.fork_rng(devices=[batch["fc"].device] if batch["fc"].is_cuda else []):
            gen = torch.Generator().manual_seed(1234)
            torch.manual_seed(1234)
            mask = (
                self.model.random_mask(len(batch["fc"]), batch["fc"].device, gen)
                if hasattr(self.model, "random_mask")
                else None
            )
            loss, logs = self.model.loss(batch["fc"], batch.get("ts"), batch.get("target"), mask=mask)
        return {"loss": float(loss), "n": len(batch["fc"]), **logs}

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        n = sum(o["n"] for o in outputs)
        return {"val_loss": sum(o["loss"] * o["n"] for o in outputs) / max(n, 1)}



def _val_rows(groups: np.ndarray, labels: np.ndarray, seed: int, frac: float = 0.2) -> np.ndarray:
    """Bool mask of a stratified, subject-grouped validation share (at least one group)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, min(round(1 / frac), len(np.unique(groups))))
    try:
        with warnings.catch_warnings():  # a class smaller than n_splits only weakens the stratification
            warnings.simplefilter("ignore", UserWarning)
            _, val = next(
                StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(labels, labels, groups)
            )
    except ValueError:  # too few members of a class for stratification
        rng = np.random.default_rng(seed)
        uniq = rng.permutation(np.unique(groups))
        val = np.flatnonzero(np.isin(groups, uniq[: max(1, len(uniq) // n_splits)]))
    mask = np.zeros(len(groups), dtype=bool)
    mask[val] = True
    return mask


def _expert_kwargs(cfg: BrainMoEConfig) -> dict[str, Any]:
    e = cfg.expert
    if e.kind == "fc_mae":
        return {"mask_ratio": e.mask_ratio}
    if e.kind == "jepa":
        return {"mask_ratio": e.mask_ratio, "window": e.window, "n_windows": e.n_windows, "ema": e.ema}
    return {}


def _states(table: pd.DataFrame, cfg: BrainMoEConfig, states: Sequence[str] | None) -> list[str]:
    if "state" not in table.columns:
        raise InputError(
            "scans have no 'state' column", fix="add the cognitive state (BIDS task-<state>) per scan"
        )
    blank = table["state"].isna() | table["state"].astype(str).str.strip().eq("")
    if blank.any():
        raise InputError(
            f"subject {table.loc[blank, 'subject'].iloc[0]}: pretraining scan without a cognitive state",
            path=table.attrs.get("source"),
            fix="fill the state column (BIDS task-<state>) of every pretraining scan",
        )
    present = sorted(table["state"].astype(str).unique())
    wanted = list(states or cfg.data.states or present)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise InputError(f"no pretraining scans for state(s) {missing}", fix=f"choose from {present}")
    return wanted


@pipeline_entry()
def pretrain(
    data: str | Path,
    out: str | Path,
    cfg: BrainMoEConfig | None = None,
    *,
    states: Sequence[str] | None = None,
    pooled: bool | None = None,
    resume: bool = False,
) -> Path:
    """One expert per cognitive state (``out/experts/<state>``) plus, by default, the expert pretrained
    on all states pooled (``out/experts/pooled``, for the baselines); ``out/experts.json`` lists them.
    ``resume``: every expert (and the state router) continues from its last checkpoint; finished ones
    are not trained again."""
    from neuromoe.models.registry import create_model, save_model

    cfg = cfg or load_brainmoe_config()
    out = Path(out)
    table = load_scans(data)
    table = table[pretrain_rows(table, cfg.data.phenotype)].reset_index(drop=True)
    if table.empty:
        raise InputError(
            "no pretraining scans (cohort 'pretrain' or unlabelled rows)",
            path=data,
            fix="add unlabelled scans of the cognitive states",
        )
    all_states = _states(table, cfg, None)
    todo = _states(table, cfg, states)
    spec = FCSpec(cfg.data.fc_kind, cfg.data.fisher_z, 0)  # n_rois: the cohort's, set by the first read
    if cfg.expert.kind == "jepa":
        spec.n_timepoints = cfg.expert.window * cfg.expert.n_windows
    if spec.kind == "tangent":  # a first read for the group mean, the covariances kept and not the series
        from neuromoe.data.connectivity import geometric_mean

        spec.reference = geometric_mean(_model_inputs(table, spec, data, covariances=True)["cov"]).tolist()
    tensors = {k: torch.from_numpy(v) for k, v in _model_inputs(table, spec, data).items()}
    n_rois = spec.n_rois
    state_of = table["state"].astype(str).to_numpy()
    groups = table["subject"].astype(str).to_numpy()
    scans = ScanSet(tensors)
    save_config(cfg, out, resume=resume)
    jobs = [(s, state_of == s) for s in todo]
    if pooled if pooled is not None else cfg.expert.pooled:
        jobs.append((POOLED, np.ones(len(table), dtype=bool)))
    manifest = _read_experts(out) if (out / EXPERTS_FILE).is_file() else {"states": [], "pooled": None}
    if (
        manifest.get("kind", cfg.expert.kind) != cfg.expert.kind
        or manifest.get("fc", spec.to_dict()) != spec.to_dict()
    ):
        raise InputError(
            f"this folder holds {manifest['kind']} experts with other FC settings or kind",
            path=out,
            fix="pretrain into a new --out folder, or use the same --expert-kind and FC settings",
        )
    for name, rows in jobs:
        kw = _expert_kwargs(cfg)
        data_rows = rows
        if cfg.expert.kind == "state_clf":
            data_rows, target = _state_clf_rows(name, rows, state_of, all_states, cfg.seed)
            kw["n_states"] = len(all_states) if name == POOLED else 2
        sub = scans.subset(data_rows)
        if cfg.expert.kind == "state_clf":
            sub.tensors["target"] = torch.as_tensor(target, dtype=torch.long)
        val = _val_rows(groups[data_rows], state_of[data_rows], cfg.seed)
        torch.manual_seed(cfg.seed)
        expert = create_model(
            f"brainmoe_expert_{cfg.expert.preset}", kind=cfg.expert.kind, n_rois=n_rois, **kw
        )
        run = out / "experts" / name
        trainer = ExpertTrainer(
            expert, cfg.pretrain, sub.subset(~val), sub.subset(val), run_dir=run / "train"
        )
        result = trainer.fit_best(resume)
        extra = {
            "kind": "expert",
            "expert_kind": cfg.expert.kind,
            "state": name,
            "states": all_states if name == POOLED else [name],
            "fc": spec.to_dict(),
            "n_scans": int(data_rows.sum()),
            "best_val_loss": result.best_metric,
        }
        if is_main_process():  # the next expert's training is the next collective
            save_model(expert.cpu(), run, {"family": FAMILY, "extra": extra})
        manifest.setdefault("summary", {})[name] = {"scans": extra["n_scans"], "best val loss": result.best_metric}
        if name == POOLED:
            manifest["pooled"] = name
        elif name not in manifest["states"]:
            manifest["states"].append(name)
    router_acc = None
    if cfg.model.router_prior:
        router_acc = _pretrain_router(scans, state_of, groups, all_states, cfg, out / ROUTER, spec, resume=resume)
        manifest["router"] = ROUTER
    if not finish_training():
        return out
    manifest.update({"kind": cfg.expert.kind, "fc": spec.to_dict()})
    atomic_write_json(out / EXPERTS_FILE, manifest)
    _add_pretrain(out, cfg, manifest, router_acc)
    return out


def _add_pretrain(out: Path, cfg: BrainMoEConfig, manifest: dict[str, Any], router_acc: float | None) -> None:
    """The pretraining report section: one row and one pair of loss curves per expert (all experts of
    the folder, also those pretrained by an earlier call with other ``--states``)."""
    from neuromoe.eval.plots import expert_curves

    names = [*manifest["states"], *([manifest["pooled"]] if manifest.get("pooled") else [])]
    summary = manifest.get("summary", {})
    section = _new_section("BrainMoE: per-state expert pretraining")
    text = (f"One '{cfg.expert.preset}' {cfg.expert.kind} expert per cognitive state on "
            f"{cfg.data.fc_kind} connectivity" + (", plus one on all states pooled (baseline)" if
                                                  manifest.get("pooled") else "") + ".")
    if router_acc is not None:
        text += f" State router (the routing prior): validation state accuracy {router_acc:.3f}."
    section.add_text(text)
    section.add_table([{"expert": n, **summary.get(n, {})} for n in names],
                      "Experts (validation loss on held-out subjects, fixed masks).")
    curves = {n: out / "experts" / n / "train" / "metrics.csv" for n in names}
    section.add_figure(expert_curves({n: p for n, p in curves.items() if p.is_file()}, title="experts: loss"),
                       "Train (dashed) and validation (solid) loss per expert.")
    section.save(out)


def _check_router_cfg(m: ModelSection) -> None:
    if m.router_prior and m.router_input != "pca":
        raise ConfigError(
            "model.router_prior needs model.router_input=pca (the state router's input)",
            fix="set model.router_input=pca or model.router_prior=false",
        )


def _pretrain_router(
    scans: ScanSet,
    state_of: np.ndarray,
    groups: np.ndarray,
    all_states: list[str],
    cfg: BrainMoEConfig,
    run: Path,
    spec: FCSpec,
    *,
    resume: bool = False,
) -> float:
    """Fit the state router on all pretraining scans: PCA of their FC, then state cross-entropy; returns
    its validation state accuracy on held-out subjects (also saved with it)."""
    from neuromoe.models.registry import create_model, save_model

    _check_router_cfg(cfg.model)
    torch.manual_seed(cfg.seed)
    router = create_model(
        f"brainmoe_router_{cfg.model.preset}",
        n_rois=spec.n_rois,
        n_states=len(all_states),
        router_pca=cfg.model.router_pca,
        dropout=cfg.model.dropout,
    )
    val = _val_rows(groups, state_of, cfg.seed)
    fc = scans.tensors["fc"]
    fit_pca(fc[torch.from_numpy(~val)][:, router.tri_i, router.tri_j], router.router_center, router.router_basis)
    sub = ScanSet({"fc": fc, "target": torch.tensor([all_states.index(s) for s in state_of])})
    tcfg = copy.deepcopy(cfg.pretrain)
    tcfg.epochs = cfg.model.router_prior_epochs
    trainer = ExpertTrainer(router, tcfg, sub.subset(~val), sub.subset(val), run_dir=run / "train")
    result = trainer.fit_best(resume)
    router.eval()
    held_out = trainer.to_device(sub.subset(val).tensors)  # the router is still on the training device
    with torch.no_grad():
        _, logs = router.loss(held_out["fc"], target=held_out["target"])
    extra = {
        "kind": ROUTER,
        "states": all_states,
        "fc": spec.to_dict(),
        "val_state_acc": logs["state_acc"],
        "best_val_loss": result.best_metric,
    }
    if is_main_process():
        save_model(router.cpu(), run, {"family": FAMILY, "extra": extra})
    return float(logs["state_acc"])


def _state_clf_rows(
    name: str, rows: np.ndarray, state_of: np.ndarray, all_states: list[str], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced "this state vs the others" rows (negatives subsampled) or all rows for the pooled expert."""
    if name == POOLED:
        return rows, np.array([all_states.index(s) for s in state_of])
    rng = np.random.default_rng(seed)
    neg = rng.permutation(np.flatnonzero(~rows))[: int(rows.sum())]
    keep = rows.copy()
    keep[neg] = True
    return keep, rows[keep].astype(int)


def _read_experts(out: Path) -> dict[str, Any]:
    path = Path(out) / EXPERTS_FILE
    if not path.is_file():
        raise InputError(
            "not a BrainMoE pretraining folder (no experts.json)",
            path=out,
            fix="pass the --out folder of 'neuromoe pretrain --family brainmoe'",
        )
    return json.loads(path.read_text())


def _load_expert(path: Path) -> tuple[Expert, dict[str, Any]]:
    from neuromoe.models.registry import load_model

    model, meta = load_model(path)
    if meta.get("extra", {}).get("kind") != "expert":
        raise ModelFormatError(
            "not a BrainMoE expert model directory",
            path=path,
            fix="pass a folder written by 'neuromoe pretrain --family brainmoe'",
        )
    return model, meta


# --------------------------------------------------------------------------------------------- train


@dataclass
class Downstream:
    """Labelled scans as tensors + label maps (phenotype / sex class names, age mean/std)."""

    table: pd.DataFrame
    scans: ScanSet
    classes: list[str]
    sex_classes: list[str]
    has_age: bool


def _downstream(
    data: str | Path,
    cfg: BrainMoEConfig,
    spec: FCSpec,
    classes: list[str] | None = None,
    sex_classes: list[str] | None = None,
) -> Downstream:
    table = load_scans(data)
    col = cfg.data.phenotype
    table = table[_is_labelled(table, col)].reset_index(drop=True)
    if table.empty:
        raise InputError(
            f"no scans with a '{col}' label", path=data, fix="set data.phenotype to the label column"
        )
    tensors = {k: torch.from_numpy(v) for k, v in _model_inputs(table, spec, data).items()}
    classes = classes or sorted(table[col].astype(str).unique())
    if len(classes) < 2:
        raise InputError(f"'{col}' has one class only ({classes})", path=data, fix="use a labelled cohort")
    tensors["phenotype"] = torch.tensor(
        [classes.index(v) if v in classes else -1 for v in table[col].astype(str)]
    )
    sex = table["sex"].fillna("").astype(str) if "sex" in table.columns else pd.Series([""] * len(table))
    sex_classes = sex_classes if sex_classes is not None else sorted(v for v in sex.unique() if v)
    tensors["sex"] = torch.tensor([sex_classes.index(v) if v in sex_classes else -1 for v in sex])
    age = pd.Series(np.nan, index=table.index)
    if "age" in table.columns:
        age = pd.to_numeric(table["age"], errors="coerce")
        text = table["age"].fillna("").astype(str).str.strip()
        bad = age.isna() & text.ne("")
        if bad.any():
            raise InputError(
                f"subject {table.loc[bad, 'subject'].iloc[0]}: age {text[bad].iloc[0]!r} is not a number",
                path=table.attrs.get("source", data),
                fix="write the age in years or leave the cell empty",
            )
    tensors["age"] = torch.tensor(age.to_numpy(dtype=np.float32))
    return Downstream(table, ScanSet(tensors), classes, sex_classes, bool(np.isfinite(age).sum() >= 3))


def finetune_loss(
    out: BrainMoEOutput, batch: dict[str, Tensor], age_stats: tuple[float, float], m: ModelSection
) -> tuple[Tensor, dict[str, float]]:
    """Phenotype CE + weighted sex CE + weighted MSE of standardised age, each on the scans that have it."""
    o = out.outputs
    y = batch["phenotype"]
    have = y >= 0
    loss = F.cross_entropy(o["phenotype"][have].float(), y[have]) if have.any() else o["phenotype"].sum() * 0
    logs = {"pheno_ce": float(loss.detach())}
    if "sex" in o and (batch["sex"] >= 0).any():
        s = batch["sex"] >= 0
        sl = F.cross_entropy(o["sex"][s].float(), batch["sex"][s])
        loss = loss + m.sex_weight * sl
        logs["sex_ce"] = float(sl.detach())
    if "age" in o and torch.isfinite(batch["age"]).any():
        a = torch.isfinite(batch["age"])
        al = F.mse_loss(o["age"][a].float(), (batch["age"][a] - age_stats[0]) / age_stats[1])
        loss = loss + m.age_weight * al
        logs["age_mse"] = float(al.detach())
    if m.z_coef > 0:
        z = router_z_loss(out.route.logits)
        loss = loss + m.z_coef * z
        logs["router_z"] = float(z.detach())
    if m.balance_coef > 0:
        bal = load_balancing_loss(out.route.probs, out.route.topk_idx, out.route.probs.shape[-1])
        loss = loss + m.balance_coef * bal
        logs["router_balance"] = float(bal.detach())
    return loss, logs


class FinetuneTrainer(Trainer):
    """Router + adapter training on cached (frozen) expert embeddings (``fit_best``: best-validation weights)."""

    def __init__(self, *args: Any, age_stats: tuple[float, float], msec: ModelSection, **kwargs: Any):
        self.age_stats, self.msec = age_stats, msec
        super().__init__(*args, **kwargs)

    def param_groups(self) -> list[dict[str, Any]]:
        """The engine's decay/no-decay groups, with the router's parameters at ``router_lr_scale`` × lr and
        (unfrozen) experts' at ``expert_lr_scale`` × lr."""
        part = {id(p): "router" for m in (self.model.router_mlp, self.model.router) for p in m.parameters()}
        part.update({id(p): "experts" for p in self.model.experts.parameters()})
        scales = {"rest": 1.0, "router": self.msec.router_lr_scale, "experts": self.msec.expert_lr_scale}
        groups = []
        for g in super().param_groups():
            for name, scale in scales.items():
                params = [p for p in g["params"] if part.get(id(p), "rest") == name]
                if params:
                    groups.append({**g, "params": params, "lr": self.cfg.lr * scale})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        """Dense routing for the first ``dense_warmup`` share of the epochs, top-k afterwards; unfrozen
        experts start training after the first ``expert_warmup`` share (router and adapter settle first)."""
        self.model.dense_routing = epoch < round(self.msec.dense_warmup * self.cfg.epochs)
        if self.msec.unfreeze_experts:
            on = epoch >= round(self.msec.expert_warmup * self.cfg.epochs)
            self.model.experts.requires_grad_(on)
            if not on:  # still frozen: no dropout either, or the adapter learns from embeddings no eval gives
                self.model.experts.eval()

    def _forward(self, batch: dict[str, Tensor]) -> BrainMoEOutput:
        return self.model(batch["fc"], batch.get("ts"), batch.get("emb"))

    def training_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss, logs = finetune_loss(self._forward(batch), batch, self.age_stats, self.msec)
        return loss, {**logs, "dense_routing": float(self.model.dense_routing)}

    def validation_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        loss, _ = finetune_loss(self._forward(batch), batch, self.age_stats, self.msec)
        return {"loss": float(loss), "n": len(batch["fc"])}

    def validation_end(self, outputs: list[dict[str, Any]]) -> dict[str, float]:
        n = sum(o["n"] for o in outputs)
        return {"val_loss": sum(o["loss"] * o["n"] for o in outputs) / max(n, 1)}


def _experts_for(experts_dir: Path) -> tuple[list[str], list[Expert], dict[str, Any], FCSpec]:
    """Per-state experts (in experts.json order), the kind/kwargs to rebuild them, and the FC spec."""
    manifest = _read_experts(experts_dir)
    names = list(manifest["states"])
    if not names:
        raise InputError(
            "no per-state experts in this folder",
            path=experts_dir,
            fix="run 'neuromoe pretrain --family brainmoe --states all'",
        )
    experts, kw = [], None
    for n in names:
        e, meta = _load_expert(experts_dir / "experts" / n)
        experts.append(e)
        kw = kw or {**meta["kwargs"], **expert_architecture(meta["architecture"], meta["kwargs"])}
    spec = FCSpec(**manifest["fc"])
    return names, experts, dict(kw or {}), spec


def _build_moe(
    experts_dir: Path, cfg: BrainMoEConfig, down: Downstream
) -> tuple[BrainMoE, list[str], FCSpec]:
    from neuromoe.models.registry import create_model

    names, experts, ekw, spec = _experts_for(experts_dir)
    m = cfg.model
    _check_router_cfg(m)
    arch = {k: ekw[k] for k in ("dim", "depth", "heads") if k in ekw}
    extra = {k: v for k, v in ekw.items() if k not in ("dim", "depth", "heads", "kind", "n_rois")}
    torch.manual_seed(cfg.seed)
    model = create_model(
        f"brainmoe_{m.preset}",
        n_rois=spec.n_rois,
        n_experts=len(names),
        expert_kind=ekw["kind"],
        expert_kwargs=extra,
        top_k=min(m.top_k, len(names)),
        router_noise=m.router_noise,
        router_input=m.router_input,
        router_pca=m.router_pca,
        dropout=m.dropout,
        n_classes=len(down.classes),
        n_sex=len(down.sex_classes),
        age=down.has_age,
        freeze_experts=not m.unfreeze_experts,
        **arch,
    )
    for target, source in zip(model.experts, experts, strict=True):
        target.load_state_dict(source.state_dict())
    if m.router_prior:
        _load_router_prior(model, experts_dir, names)
    return model, names, spec


def _load_router_prior(model: BrainMoE, experts_dir: Path, names: list[str]) -> None:
    from neuromoe.models.registry import load_model

    if not _read_experts(experts_dir).get("router"):
        raise InputError(
            "model.router_prior is on but this pretraining folder has no state router",
            path=experts_dir,
            fix="re-run pretrain with --set model.router_prior=true model.router_input=pca",
        )
    prior, meta = load_model(experts_dir / ROUTER)
    states = meta["extra"]["states"]
    if sorted(states) != sorted(names) or meta["kwargs"].get("router_pca") != len(model.router_basis):
        raise InputError(
            f"the state router covers {states} with router_pca {meta['kwargs'].get('router_pca')}; "
            f"the experts are {names}, router_pca {len(model.router_basis)}",
            path=experts_dir / ROUTER,
            fix="re-run pretrain with all states and the fine-tuning model.router_pca",
        )
    model.load_router_prior(prior, [states.index(n) for n in names])


@torch.no_grad()
def _embeddings(model: BrainMoE, scans: ScanSet, batch_size: int = 32) -> Tensor:
    """Every expert's embedding of every scan (on the CPU), computed wherever the model is."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(scans), batch_size):
        b = scans.subset(np.arange(s, min(s + batch_size, len(scans)))).tensors
        ts = b.get("ts")
        out.append(model.expert_embeddings(b["fc"].to(dev), None if ts is None else ts.to(dev)).cpu())
    return torch.cat(out)


def _age_stats(down: Downstream, rows: np.ndarray) -> tuple[float, float]:
    a = down.scans.tensors["age"].numpy()[rows]
    a = a[np.isfinite(a)]
    return (float(a.mean()), float(a.std() or 1.0)) if a.size >= 2 else (0.0, 1.0)


def _fit_moe(
    model: BrainMoE, down: Downstream, train_rows: np.ndarray, cfg: BrainMoEConfig, run_dir: Path,
    resume: bool = False,
) -> tuple[BrainMoE, tuple[float, float], Any]:
    """Train router + adapter on ``train_rows``.

    With ``train.patience > 0`` an inner stratified validation split drives early stopping and the
    best-validation weights are kept; with ``patience = 0`` (small cohorts, where a handful of validation
    subjects only adds noise) every training subject is used for a fixed number of epochs.
    """
    scans = down.scans
    emb = _embeddings(model, scans)
    if model.freeze_experts:  # cached: fine-tuning then costs router + adapter only
        scans = ScanSet({**scans.tensors, "emb": emb})
    idx = np.flatnonzero(train_rows)
    groups = down.table["subject"].astype(str).to_numpy()[idx]
    y = scans.tensors["phenotype"].numpy()[idx]
    val = _val_rows(groups, y, cfg.seed) if cfg.train.patience > 0 else np.zeros(len(idx), dtype=bool)
    model.set_embedding_stats(emb[idx[~val]])
    if model.router_input == "pca" and not cfg.model.router_prior:  # else the state router's basis
        model.set_router_basis(scans.tensors["fc"][idx[~val]])
    age_stats = _age_stats(down, idx[~val])
    trainer = FinetuneTrainer(
        model,
        cfg.train,
        scans.subset(idx[~val]),
        scans.subset(idx[val]) if val.any() else None,
        run_dir=run_dir,
        age_stats=age_stats,
        msec=cfg.model,
    )
    result = trainer.fit_best(resume)
    model.dense_routing = False
    return model.cpu().eval(), age_stats, result


def _meta(
    down: Downstream,
    names: list[str],
    spec: FCSpec,
    age_stats: tuple[float, float],
    cfg: BrainMoEConfig,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "family": FAMILY,
        "label_maps": {"phenotype": down.classes, "sex": down.sex_classes},
        "tasks": [
            {"name": "phenotype", "type": "classification", "column": cfg.data.phenotype},
            *([{"name": "sex", "type": "classification", "column": "sex"}] if down.sex_classes else []),
            *([{"name": "age", "type": "regression", "column": "age"}] if down.has_age else []),
        ],
        "extra": {
            "kind": "brainmoe",
            "experts": names,
            "fc": spec.to_dict(),
            "age_stats": list(age_stats),
            **extra,
        },
    }


@pipeline_entry()
def train(
    data: str | Path, out: str | Path, cfg: BrainMoEConfig | None = None, *, experts: str | Path,
    resume: bool = False,
) -> Path:
    """Fine-tune router + adapter (experts frozen unless ``model.unfreeze_experts``) → ``out/model``;
    ``resume`` continues from ``out``'s last checkpoint."""
    from neuromoe.models.registry import save_model, weights_digest

    cfg = cfg or load_brainmoe_config()
    out, experts = Path(out), Path(experts)
    _, _, _, spec = _experts_for(experts)
    down = _downstream(data, cfg, spec)
    model, names, spec = _build_moe(experts, cfg, down)
    save_config(cfg, out, resume=resume)
    rows = np.ones(len(down.table), dtype=bool)
    if "split" in down.table.columns and down.table["split"].astype(str).isin(["train", "val"]).any():
        rows = down.table["split"].astype(str).isin(["train", "val"]).to_numpy()
    model, age_stats, result = _fit_moe(model, down, rows, cfg, out, resume)
    if not finish_training():
        return out
    save_model(
        model,
        out / "model",
        _meta(
            down,
            names,
            spec,
            age_stats,
            cfg,
            n_train=int(rows.sum()),
            best_val_loss=result.best_metric,
            experts_weights={n: weights_digest(experts / "experts" / n) for n in names},
        ),
    )
    _add_train(out, cfg, model, down, rows, names, age_stats, result.best_metric)
    return out


def _add_train(
    out: Path,
    cfg: BrainMoEConfig,
    model: BrainMoE,
    down: Downstream,
    rows: np.ndarray,
    names: list[str],
    age_stats: tuple[float, float],
    best: float,
) -> None:
    """What the router + adapter were fitted on and which experts the router now prefers on those scans
    (out-of-fold scores: ``evaluate``)."""
    from neuromoe.eval.plots import bar_chart

    m = cfg.model
    table = down.table[rows]
    section = _new_section("BrainMoE: router + adapter fine-tuning")
    section.add_text(
        f"Experts {', '.join(names)} ({'fine-tuned' if m.unfreeze_experts else 'frozen'}); top-{m.top_k} router "
        f"on {m.router_input} input{' started from the state router' if m.router_prior else ''}; '{m.preset}' "
        f"adapter. Fitted on {len(table)} scans of {table['subject'].nunique()} subjects; best validation "
        f"loss {f'{best:.4f}' if np.isfinite(best) else 'n/a (fixed epochs, no validation split)'}."
    )
    tasks = [("phenotype", ", ".join(down.classes))]
    tasks += [("sex", ", ".join(down.sex_classes))] if down.sex_classes else []
    tasks += [("age", "years (standardised in the loss)")] if down.has_age else []
    section.add_table([{"task": t, "classes": c} for t, c in tasks], "Downstream tasks.")
    top = _run_moe(model, down.scans.subset(rows), age_stats)["topk_idx"]
    share = {n: float((top == i).any(1).mean()) for i, n in enumerate(names)}
    section.add_figure(
        bar_chart(share, title="expert selected among the top-k", ylabel="share of training scans"),
        "Per expert: share of the training scans whose top-k includes it (router preference after fine-tuning).",
    )
    section.save(out)


# ------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def _run_moe(
    model: BrainMoE, scans: ScanSet, age_stats: Sequence[float], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Probabilities, de-standardised age, top-k experts/weights, router probs and joint embedding per scan."""
    model.eval()
    dev = next(model.parameters()).device  # the batches follow the model (CPU or --device cuda)
    res: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(scans), batch_size):
        b = {k: v.to(dev) for k, v in scans.subset(np.arange(s, min(s + batch_size, len(scans)))).tensors.items()}
        emb = b.get("emb")
        if emb is None:
            emb = model.expert_embeddings(b["fc"], b.get("ts"))
        o = model(b["fc"], b.get("ts"), emb)
        chosen = emb.gather(1, o.route.topk_idx[..., None].expand(-1, -1, emb.shape[-1]))
        parts = {
            "phenotype": o.outputs["phenotype"].softmax(-1),
            "topk_idx": o.route.topk_idx,
            "topk_w": o.route.topk_weights,
            "router_probs": o.route.probs,
            "joint": (chosen * o.route.topk_weights[..., None]).sum(1),
            "emb": emb,
        }
        if "sex" in o.outputs:
            parts["sex"] = o.outputs["sex"].softmax(-1)
        if "age" in o.outputs:
            parts["age"] = o.outputs["age"] * age_stats[1] + age_stats[0]
        for k, v in parts.items():
            res.setdefault(k, []).append(v.cpu().numpy() if k == "topk_idx" else v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in res.items()}


# ------------------------------------------------------------------------------------------ evaluate


def _sklearn_baselines(
    x_tr: np.ndarray,
    x_te: np.ndarray,
    y_tr: dict[str, np.ndarray],
    ev: EvalSection,
    seed: int,
    n_classes: dict[str, int] | None = None,
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Pooled-expert embedding + MLP and + SVM (linear/RBF, C by inner CV): class probabilities / ages.

    The inner CV is grouped by ``groups`` (the subject of each training row): with several scans per subject
    an ungrouped split would pick C on scans of subjects it was fitted on."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    out: dict[str, dict[str, np.ndarray]] = {"mlp": {}, "svm": {}}
    grid = [{"svc__kernel": ["linear", "rbf"], "svc__C": ev.svm_c}]
    for task, y in y_tr.items():
        have = np.isfinite(y) if task == "age" else y >= 0
        gt = np.arange(len(y))[have] if groups is None else np.asarray(groups)[have]
        if have.sum() < 4 or len(np.unique(gt)) < 2 or (task != "age" and len(np.unique(y[have])) < 2):
            # said, not silent: the summary then has no pooled+MLP/SVM entry for this task
            print(f"neuromoe: pooled baselines skip '{task}' in this fold: {int(have.sum())} labelled training "
                  "scans (need 4, of 2+ subjects and, for a class, 2+ classes)", file=sys.stderr)
            continue
        xt, yt = x_tr[have], y[have]
        n_groups = len(np.unique(gt))
        if task == "age":
            mlp = make_pipeline(  # ages in years as the target: no convergence in 2000 epochs, MAE 20 y
                StandardScaler(),
                TransformedTargetRegressor(
                    MLPRegressor(hidden_layer_sizes=(ev.mlp_hidden,), max_iter=2000, random_state=seed),
                    transformer=StandardScaler(),
                ),
            )
            svm = GridSearchCV(  # standardised ages too: SVR's epsilon and C are in units of the target
                TransformedTargetRegressor(make_pipeline(StandardScaler(), SVR()), transformer=StandardScaler()),
                [{"regressor__svr__kernel": ["linear", "rbf"], "regressor__svr__C": ev.svm_c}],
                cv=GroupKFold(min(3, n_groups)),
                scoring="neg_mean_squared_error",
            )
            out["mlp"][task] = mlp.fit(xt, yt).predict(x_te)
            out["svm"][task] = svm.fit(xt, yt, groups=gt).predict(x_te)
            continue
        n_cls = (n_classes or {}).get(task, int(y.max()) + 1)  # also classes absent from this fold
        mlp = make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(ev.mlp_hidden,), max_iter=2000, random_state=seed),
        )
        mlp.fit(xt, yt.astype(int))
        p = np.zeros((len(x_te), n_cls))
        p[:, mlp.classes_] = mlp.predict_proba(x_te)
        out["mlp"][task] = p
        # every inner training fold needs every class: at most as many folds as the rarest class has subjects
        n_cv = min(3, min(len(np.unique(gt[yt == c])) for c in np.unique(yt)))
        if n_cv >= 2:
            cv = StratifiedGroupKFold(n_cv, shuffle=True, random_state=seed)
            svm = GridSearchCV(make_pipeline(StandardScaler(), SVC()), grid, cv=cv, scoring="f1_macro")
            svm.fit(xt, yt.astype(int), groups=gt)
        else:  # an inner search would fit SVMs on one class (sklearn: a wall of FitFailedWarnings, C arbitrary)
            print(f"neuromoe: pooled+SVM for '{task}' in this fold: a class has one labelled training subject, "
                  "too few to choose the kernel and C by inner CV; sklearn's default SVC (RBF, C=1) is used",
                  file=sys.stderr)
            svm = make_pipeline(StandardScaler(), SVC()).fit(xt, yt.astype(int))
        out["svm"][task] = np.eye(n_cls)[svm.predict(x_te)]  # one-hot: F1/accuracy only
    return out


def _chance(y_train: dict[str, np.ndarray], n: int, n_classes: dict[str, int], age: bool) -> dict[str, np.ndarray]:
    """What knowing nothing about a scan gives: the fold's majority training class (phenotype, sex) and its
    mean training age, for each of ``n`` test scans. The floor the models' rows are read against (a sex
    macro-F1 of 0.43, or an age MAE of 12 y, looked like results)."""
    out: dict[str, np.ndarray] = {}
    for task, k in n_classes.items():
        labels = y_train[task][y_train[task] >= 0]
        out[task] = np.tile(np.eye(k)[np.bincount(labels, minlength=k).argmax()], (n, 1))
    if age:
        out["age"] = np.full(n, np.nanmean(y_train["age"]))
    return out


def _fold_metrics(pred: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, float]:
    from neuromoe.eval.metrics import classification_metrics, regression_metrics

    res: dict[str, float] = {}
    for task in ("phenotype", "sex"):
        if task in pred:
            have = y[task] >= 0
            m = classification_metrics(y[task][have], pred[task][have])
            res[f"{task}_f1_macro"], res[f"{task}_accuracy"] = m["f1_macro"], m["accuracy"]
    if "age" in pred:
        have = np.isfinite(y["age"])
        m = regression_metrics(y["age"][have], pred["age"][have])
        res["age_mae"], res["age_mse"] = m["mae"], m["rmse"] ** 2
    return res


@removes_on_error("metrics.json", "predictions.csv", "report/section.json")
@pipeline_entry()
def evaluate(
    experts: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: BrainMoEConfig | None = None,
    *,
    section: Any = None,
) -> Path:
    """Stratified k-fold over labelled subjects: BrainMoE vs pooled expert + MLP vs pooled expert + SVM.

    Writes ``out/metrics.json`` (per fold and mean ± std), ``out/predictions.csv`` (out-of-fold) and the
    report section (metrics table, router-preference histogram, expert-embedding correlation matrix).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    cfg = cfg or load_brainmoe_config()
    out, experts = Path(out), Path(experts)
    manifest = _read_experts(experts)
    _, _, _, spec = _experts_for(experts)
    down = _downstream(data, cfg, spec)
    t = down.scans.tensors
    y = {"phenotype": t["phenotype"].numpy(), "sex": t["sex"].numpy(), "age": t["age"].numpy()}
    groups = down.table["subject"].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    folds = min(cfg.eval.folds, n_groups, int(np.bincount(y["phenotype"][y["phenotype"] >= 0]).min()))
    if folds < 2:
        raise InputError(
            f"too few labelled subjects for cross-validation ({n_groups})",
            path=data,
            fix="add labelled subjects or lower eval.folds",
        )
    pooled = None
    if manifest.get("pooled"):
        pe, _ = _load_expert(experts / "experts" / POOLED)
        pooled = _embeddings_single(pe, down.scans)
    if folds < cfg.eval.folds:  # said, not silent: the smallest class (in scans) caps the folds
        print(f"neuromoe: {folds}-fold cross-validation, not {cfg.eval.folds}: the smallest class has "
              f"{int(np.bincount(y['phenotype'][y['phenotype'] >= 0]).min())} scans", file=sys.stderr)
    save_config(cfg, out)  # the folds train from this config: the evaluation folder records it
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=cfg.seed)
    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.train.resumable = False  # folds are never resumed: no per-epoch checkpoint writes
    per_fold: dict[str, list[dict[str, float]]] = {"BrainMoE": [], "pooled+MLP": [], "pooled+SVM": [],
                                                   "chance": []}
    oof: dict[str, np.ndarray] = {}
    names: list[str] = []
    for f, (tr, te) in enumerate(splitter.split(y["phenotype"], y["phenotype"], groups)):
        model, names, _ = _build_moe(experts, cfg, down)
        train_rows = np.zeros(len(groups), dtype=bool)
        train_rows[tr] = True
        model, age_stats, _ = _fit_moe(model, down, train_rows, fold_cfg, out / "folds" / f"fold{f}")
        res = _run_moe(model, down.scans.subset(te), age_stats)
        for k, v in res.items():
            oof.setdefault(k, np.zeros((len(groups), *v.shape[1:]), dtype=v.dtype))[te] = v
        oof.setdefault("fold", np.full(len(groups), -1))[te] = f
        yte = {k: v[te] for k, v in y.items()}
        per_fold["BrainMoE"].append(
            _fold_metrics({k: res[k] for k in ("phenotype", "sex", "age") if k in res}, yte)
        )
        per_fold["chance"].append(_fold_metrics(_chance({k: v[tr] for k, v in y.items()}, len(te),
                                                        {k: res[k].shape[1] for k in ("phenotype", "sex") if k in res},
                                                        "age" in res), yte))
        if pooled is not None:
            base = _sklearn_baselines(
                pooled[tr], pooled[te], {k: v[tr] for k, v in y.items()}, cfg.eval, cfg.seed,
                {"phenotype": len(down.classes), "sex": len(down.sex_classes)}, groups[tr],
            )
            per_fold["pooled+MLP"].append(_fold_metrics(base["mlp"], yte))
            per_fold["pooled+SVM"].append(_fold_metrics(base["svm"], yte))
    if not finish_training():
        return out
    per_fold = {k: v for k, v in per_fold.items() if v}

    def _mean_std(v: list[dict[str, float]], k: str) -> list[float]:
        x = np.array([f.get(k, np.nan) for f in v], dtype=float)  # a task a fold's baseline skipped: NaN
        return [float(np.nanmean(x)), float(np.nanstd(x))] if np.isfinite(x).any() else [np.nan, np.nan]

    summary = {
        m: {k: _mean_std(v, k) for k in dict.fromkeys(k for f in v for k in f)} for m, v in per_fold.items()
    }
    combos = Counter("+".join(sorted(names[i] for i in row)) for row in oof["topk_idx"])
    share = {n: float((oof["topk_idx"] == i).any(1).mean()) for i, n in enumerate(names)}
    weight = {
        n: float(np.where(oof["topk_idx"] == i, oof["topk_w"], 0).sum(1).mean()) for i, n in enumerate(names)
    }
    corr = _embedding_correlation(oof["emb"])
    metrics = {
        "folds": folds,
        "n_scans": len(groups),
        "n_subjects": n_groups,
        "classes": down.classes,
        "experts": names,
        "expert_kind": manifest.get("kind"),
        # the report says how the experts were trained in the folds (it said "frozen" whatever ran)
        "experts_adapted": bool(cfg.model.unfreeze_experts),
        "expert_lr_scale": float(cfg.model.expert_lr_scale) if cfg.model.unfreeze_experts else 0.0,
        "fc": {"kind": spec.kind, "fisher_z": spec.fisher_z},
        "summary": summary,
        "per_fold": per_fold,
        "router": {
            "combinations": dict(combos.most_common()),
            "selected_share": share,
            "mean_weight": weight,
        },
        "expert_embedding_correlation": corr.tolist(),
    }
    atomic_write_json(out / "metrics.json", metrics, strict=True)
    frame = scan_ids(down.table)
    frame["fold"] = oof["fold"]  # the per-fold metrics can be recomputed from this table
    frame["phenotype"] = down.table[cfg.data.phenotype].to_numpy()
    for ci, c in enumerate(down.classes):
        frame[f"phenotype_p_{c}"] = oof["phenotype"][:, ci]
    frame["top_experts"] = [" ".join(names[i] for i in row) for row in oof["topk_idx"]]
    with atomic_path(out / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    own = section is None
    section = _new_section("BrainMoE: k-fold evaluation") if own else section
    _add_evaluation(section, metrics, combos, names, corr)
    if own:
        section.save(out)
    return out


@torch.no_grad()
def _embeddings_single(expert: Expert, scans: ScanSet, batch_size: int = 32) -> np.ndarray:
    expert.eval()
    dev = next(expert.parameters()).device
    t = scans.tensors  # moved a batch at a time: the whole cohort's FC matrices can exceed a GPU's memory
    return torch.cat(
        [
            expert.embed(t["fc"][s : s + batch_size].to(dev),
                         None if "ts" not in t else t["ts"][s : s + batch_size].to(dev)).float().cpu()
            for s in range(0, len(scans), batch_size)
        ]
    ).numpy()


def _embedding_correlation(emb: np.ndarray) -> np.ndarray:
    """E × E correlation between experts' scan-similarity structures (RSA: each expert's scan × scan
    correlation matrix, upper triangle, correlated across experts), comparable across embedding spaces."""
    n, e, _ = emb.shape
    iu = np.triu_indices(n, 1)
    sims = []
    for i in range(e):
        z = emb[:, i]
        z = (z - z.mean(0)) / (z.std(0) + 1e-8)
        sims.append(np.corrcoef(z)[iu])
    return np.atleast_2d(np.corrcoef(np.nan_to_num(np.stack(sims))))  # one expert: a 1 × 1 matrix


def _new_section(title: str) -> Any:
    from neuromoe.eval.report import Report

    return Report("BrainMoE").section(title)


def _fmt(v: Sequence[float]) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def _add_evaluation(
    section: Any, metrics: dict[str, Any], combos: Counter, names: list[str], corr: np.ndarray
) -> None:
    from neuromoe.eval.plots import bar_chart, heatmap

    s = metrics["summary"]
    adapted = (f"adapted (lr × {metrics['expert_lr_scale']:g})" if metrics.get("experts_adapted") else "frozen")
    section.add_text(
        f"Stratified {metrics['folds']}-fold cross-validation over {metrics['n_subjects']} labelled subjects "
        f"({metrics['n_scans']} scans). BrainMoE = {adapted} per-state {metrics['expert_kind']} experts "
        f"({', '.join(names)}) + FC router (top-{len(next(iter(combos)).split('+'))}) + transformer adapter; "
        "baselines = the expert pretrained on all states pooled, with an MLP head or an SVM (linear/RBF, C by "
        "inner CV), fitted on the same folds; chance = each fold's majority training class and mean training "
        "age, the floor every row is read against."
    )
    keys = list(next(iter(s.values())))
    section.add_table(
        [{"metric": k, **{m: _fmt(s[m][k]) for m in s if k in s[m]}} for k in keys],
        "Mean ± std over folds (macro-F1/accuracy: higher is better; age MAE in years, MSE in years²).",
    )
    from matplotlib.figure import Figure

    total = sum(combos.values())
    top = combos.most_common(10)
    fig = Figure(figsize=(5.5, 1.2 + 0.35 * len(top)))
    ax = fig.subplots()
    ax.barh(range(len(top)), [v / total for _, v in top], color="tab:blue", alpha=0.8)
    ax.set_yticks(range(len(top)), [k for k, _ in top])
    ax.invert_yaxis()
    ax.set(xlabel="share of scans", title="dominant expert combination (router preference)")
    fig.tight_layout()
    section.add_figure(fig, "Share of out-of-fold scans routed to each top-k expert combination.")
    section.add_figure(
        bar_chart(
            metrics["router"]["selected_share"],
            title="expert selected among the top-k",
            ylabel="share of scans",
        ),
        "Per expert: share of out-of-fold scans whose top-k includes it.",
    )
    section.add_figure(
        heatmap(corr, names, names, title="expert-embedding correlation (RSA)", cbar_label="r"),
        "Correlation between experts' scan-similarity structures on the downstream scans.",
    )


# ------------------------------------------------------------------------------------ predict / embed


def _load_moe(model_dir: str | Path, device: str = "cpu") -> tuple[BrainMoE | Expert, dict[str, Any]]:
    from neuromoe.models.registry import load_model, require_meta

    dev = resolve_device(device)  # before loading: --device cuda without a GPU is one clear error
    model, meta = load_model(model_dir)
    if meta["family"] != FAMILY or meta.get("extra", {}).get("kind") not in ("brainmoe", "expert"):
        raise ModelFormatError(
            "not a BrainMoE model directory",
            path=model_dir,
            fix="pass RUN/model from 'neuromoe train --family brainmoe' (or an expert folder)",
        )
    needs = ("extra.fc", "extra.age_stats", "extra.experts", "label_maps") if meta["extra"]["kind"] == "brainmoe" else (
        "extra.fc",)
    require_meta(meta, needs, model_dir)
    return model.to(dev), meta


def _input_scans(source: str | Path) -> pd.DataFrame:
    """Scan table from one series file or 4D BOLD NIfTI, a folder of series, a manifest, a BIDS or cohort folder.

    Missing files are not refused here: in batch mode they are per-scan failures like any other bad file.
    """
    from neuromoe.data.fmri import fmri_table

    source = Path(source)
    if source.is_file() and source.name.lower().endswith((".nii", ".nii.gz")):  # 4D BOLD → default atlas
        return file_ids([source]).assign(bold=str(source))
    if (
        source.is_file()
        and source.suffix.lower() in (".npy", ".tsv", ".csv")
        and not _is_manifest(source)
    ):
        return file_ids([source]).assign(timeseries=str(source))
    if source.is_file() and not _is_manifest(source):  # e.g. Analyze .img/.hdr, .mgz
        raise InputError(
            "not a time-series file, a NIfTI file name, nor a manifest",
            path=source,
            fix="give ROI time series (.npy/.tsv/.csv), a 4D .nii/.nii.gz BOLD run, a folder, a manifest "
            "(.csv/.tsv with a subject column) or a BIDS folder",
        )
    bids = source.is_dir() and any(p.is_dir() for p in source.glob("sub-*"))  # sub-* FILES are series
    if source.is_dir() and not (source / "manifests").is_dir() and not bids:
        # every series format a single file may be (a .csv was silently skipped); manifests are not series
        files = sorted(p for p in source.iterdir()
                       if p.suffix.lower() in (".npy", ".tsv", ".csv") and not _is_manifest(p))
        if files:
            return file_ids(files).assign(timeseries=[str(f) for f in files])
    if source.is_dir() and (source / "manifests" / "fmri.csv").is_file():
        source = source / "manifests" / "fmri.csv"
    if not source.exists():
        raise InputError(
            "input not found", path=source, fix="pass a time-series file, folder, manifest or BIDS folder"
        )
    return fmri_table(source, check_files=False)


def _is_manifest(path: Path) -> bool:
    if path.suffix.lower() not in (".csv", ".tsv"):
        return False
    head = path.read_text(errors="replace").splitlines()[:1]
    return bool(head) and "subject" in head[0]


def _scan_file(row: pd.Series) -> str:
    for role in ("timeseries", "bold"):
        if isinstance(row.get(role), str) and row.get(role):
            return str(row[role])
    return ""


def _scan_inputs(source: str | Path, table: pd.DataFrame) -> list[Any]:
    """The files a prediction reads: the source (a manifest or one series) and every scan's files."""
    return [source, *(v for c in ("bold", "timeseries") if c in table for v in table[c])]


def _batch_scans(
    meta: dict[str, Any], table: pd.DataFrame, where: Any, what: str
) -> tuple[ScanSet, pd.DataFrame, list[dict[str, str]]]:
    """Model inputs of every scan that loads; a scan that does not is skipped and reported, so one bad file
    never stops a batch. One scan (``len(table) == 1``) raises its own error; all failing raises."""
    from neuromoe.data.connectivity import check_timeseries
    from neuromoe.data.fmri import scan_timeseries

    spec = FCSpec(**meta["extra"]["fc"])
    series, fcs, crops, kept, failures = [], [], [], [], []

    def flush() -> None:  # FC of the scans read so far, batched, and their series let go
        files = [_scan_file(table.loc[i]) or str(where) for i in kept[len(kept) - len(series) :]]
        fcs.append(_fc(series, spec, files))
        series.clear()

    cache = _series_cache()
    for i, row in table.iterrows():
        file = _scan_file(row)
        try:
            x = scan_timeseries(row, cache=cache)
            _check_rois([x.shape], spec.n_rois, file or where)
            check_timeseries(x, source=file or where)  # what _fc refuses (constant ROI) fails this scan only
            if spec.n_timepoints:  # the JEPA window, checked and cut once per scan
                crops.append(_crop([x], spec.n_timepoints, file or where)[0])
        except Exception as exc:
            if len(table) == 1:
                raise
            msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
            failures.append({"subject": str(row["subject"]), "file": file, "error": msg})
            print(f"neuromoe: skipped {row['subject']}: {msg}", file=sys.stderr)
            continue
        series.append(x)
        kept.append(i)
        if len(series) == _READ_CHUNK:
            flush()
    if series:
        flush()
    if not kept:
        raise InputError(
            f"no scan could be {what} ({len(failures)} failed, listed above)", path=where, fix="fix the listed files"
        )
    tensors = {"fc": torch.from_numpy(np.concatenate(fcs))}
    if spec.n_timepoints:
        tensors["ts"] = torch.from_numpy(np.stack(crops))
    return ScanSet(tensors), table.loc[kept].reset_index(drop=True), failures


@pipeline_entry()
def predict(
    model_dir: str | Path, inputs: str | Path, output: str | Path, *, device: str = "auto"
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Per scan: phenotype class + probabilities, sex, age, top experts with router weights → CSV.

    Returns ``(table, failures)``; failed scans are listed in ``<output>_failures.csv``.
    """
    model, meta = _load_moe(model_dir, device)
    if not isinstance(model, BrainMoE):
        raise ModelFormatError(
            "an expert cannot predict phenotypes",
            path=model_dir,
            fix="pass RUN/model from 'neuromoe train --family brainmoe'",
        )
    table = _input_scans(inputs)
    check_outputs([output, failures_path(output)], _scan_inputs(inputs, table))
    try:
        scans, table, failures = _batch_scans(meta, table, inputs, "predicted")
    except InputError:  # nothing predicted: no earlier run's predictions stay under this run's name
        remove_stale(output, failures_path(output))
        raise
    res = _run_moe(model, scans, meta["extra"]["age_stats"])
    names, lm = meta["extra"]["experts"], meta["label_maps"]
    frame = scan_ids(table)
    frame["phenotype"] = [lm["phenotype"][i] for i in res["phenotype"].argmax(1)]
    for ci, c in enumerate(lm["phenotype"]):
        frame[f"phenotype_p_{c}"] = res["phenotype"][:, ci]
    if "sex" in res:
        frame["sex"] = [lm["sex"][i] for i in res["sex"].argmax(1)]
        frame[f"sex_p_{lm['sex'][-1]}"] = res["sex"][:, -1]
    if "age" in res:
        frame["age"] = res["age"]
    frame["top_experts"] = [" ".join(names[i] for i in row) for row in res["topk_idx"]]
    frame["top_weights"] = [" ".join(f"{w:.3f}" for w in row) for row in res["topk_w"]]
    with atomic_path(output) as tmp:
        frame.to_csv(tmp, index=False)
    write_failures(failures_path(output), failures)
    return frame, failures


@pipeline_entry()
def embed(
    model_dir: str | Path, data: str | Path, out: str | Path, *, device: str = "auto"
) -> tuple[Path, list[dict[str, str]]]:
    """Joint embeddings (router-weighted top-k expert embeddings; or one expert's embedding) per scan.

    ``out`` ending in ``.npy`` writes the (N, D) array plus ``<stem>_subjects.csv``; otherwise a CSV with
    subject (state) and ``e0..e{D-1}`` columns. Returns ``(out, failures)`` like :func:`predict`.
    """
    model, meta = _load_moe(model_dir, device)
    table = _input_scans(data)
    out = Path(out)
    npy, ids_csv = out.suffix.lower() == ".npy", out.with_name(out.stem + "_subjects.csv")  # ids beside a .npy
    check_outputs([out, failures_path(out), *([ids_csv] if npy else [])], _scan_inputs(data, table))
    try:
        scans, table, failures = _batch_scans(meta, table, data, "embedded")
    except InputError:
        remove_stale(out, failures_path(out), *([ids_csv] if npy else []))
        raise
    if isinstance(model, BrainMoE):
        vectors = _run_moe(model, scans, meta["extra"]["age_stats"])["joint"]
    else:
        vectors = _embeddings_single(model, scans)
    ids = scan_ids(table)
    if npy:
        # Both files are written before either is renamed, so an interruption can leave a mismatched
        # pair only between two back-to-back renames.
        with atomic_path(out, suffix=".npy") as tmp, atomic_path(ids_csv) as tmp_ids:
            np.save(tmp, vectors.astype(np.float32))
            ids.to_csv(tmp_ids, index=False)
    else:
        frame = pd.concat(
            [ids, pd.DataFrame(vectors, columns=[f"e{i}" for i in range(vectors.shape[1])])], axis=1
        )
        with atomic_path(out) as tmp:
            frame.to_csv(tmp, index=False)
    write_failures(failures_path(out), failures)
    return out, failures


# ----------------------------------------------------------------------------------------------- demo


@pipeline_entry()
def demo(
    cohort_dir: str | Path, out_dir: str | Path, *, device: str = "auto", seed: int = 0, preset: str = "demo"
) -> Path:
    """Pretrain per-state experts (+ pooled) → fine-tune → k-fold evaluation → report section."""
    out = Path(out_dir)
    cfg = load_brainmoe_config(preset, seed=seed, device=device)
    pretrain(cohort_dir, out / "pretrain", cfg)
    train(cohort_dir, out / "train", cfg, experts=out / "pretrain")
    section = _new_section("BrainMoE (fMRI): per-state experts → FC router → transformer adapter")
    experts = _read_experts(out / "pretrain")
    acc = json.loads((out / "pretrain" / ROUTER / "config.json").read_text())["extra"]["val_state_acc"] \
        if experts.get("router") else None
    table = load_scans(cohort_dir)
    states = Counter(table[_is_labelled(table, cfg.data.phenotype)]["state"].astype(str))
    section.add_text(
        f"Experts pretrained per state ({', '.join(experts['states'])}) on the unlabelled pretraining scans"
        + (f"; the state router's accuracy on its validation scans: {acc:.2f}" if acc is not None else "")
        + f". Downstream (labelled) scans by state: {', '.join(f'{k} {v}' for k, v in sorted(states.items()))} — "
        "the router-preference plots below are read against this mix."
    )
    evaluate(out / "pretrain", cohort_dir, out / "evaluate", cfg, section=section)
    section.save(out)
    print(f"brainmoe demo: report section in {out}", file=sys.stderr)
    return out
