"""ROI time series from state-specific network connectivity (Power-264 coordinates by default)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

STATES = ("rest", "wm", "motor", "language", "emotion")
INFORMATIVE_STATE = "wm"
N_NETWORKS = 7
# Networks each task drives with its block regressor.
TASK_NETWORKS = {"wm": (0, 1), "motor": (2,), "language": (3, 4), "emotion": (5,)}


@lru_cache(maxsize=2)
def power_coords() -> np.ndarray:
    """(264, 3) MNI coordinates of the Power-2011 atlas (bundled with nilearn)."""
    from nilearn import datasets

    rois = datasets.fetch_coords_power_2011().rois
    return rois[["x", "y", "z"]].to_numpy(dtype=np.float64)


def rois(n_rois: int) -> np.ndarray:
    """Evenly subsampled Power coordinates (all 264 by default)."""
    c = power_coords()
    if n_rois >= len(c):
        return c
    return c[np.linspace(0, len(c) - 1, n_rois).round().astype(int)]


def networks(coords: np.ndarray) -> np.ndarray:
    """Assign ROIs to spatial networks by k-means on coordinates (deterministic)."""
    from sklearn.cluster import KMeans

    k = min(N_NETWORKS, len(coords))
    return KMeans(k, n_init=4, random_state=0).fit_predict(coords)


def design(n_rois: int, seed: int) -> dict:
    """Cohort-level ground truth: networks, state couplings, affected edges of the phenotype."""
    rng = np.random.default_rng([seed, 7])
    coords = rois(n_rois)
    net = networks(coords)
    k = int(net.max()) + 1
    base = rng.uniform(-0.15, 0.15, (k, k))
    base = (base + base.T) / 2
    np.fill_diagonal(base, 0.6)
    couplings = {}
    for s in STATES:
        d = rng.uniform(-0.25, 0.25, (k, k))
        couplings[s] = np.clip(base + (d + d.T) / 2 * (s != "rest"), -0.8, 0.8)
        np.fill_diagonal(couplings[s], 0.6)
    # Phenotype edges: pairs between the two WM networks, expressed in the informative state only.
    a = np.flatnonzero(net == 0)
    b = np.flatnonzero(net == 1)
    # Disjoint pairs, so each ROI carries one extra shared drive and the effect stays edge-specific.
    pat_edges = sorted((int(min(i, j)), int(max(i, j)))
                       for i, j in zip(rng.permutation(a)[:6], rng.permutation(b)[:6], strict=False))
    # disjoint too: pairs drawn with replacement stacked the drive on a shared ROI (4× on one pair at 8 ROIs)
    sex_edges = sorted((int(min(i, j)), int(max(i, j))) for i, j in zip(
        rng.permutation(np.flatnonzero(net == 2))[:4], rng.permutation(np.flatnonzero(net == 3))[:4], strict=False))
    return {"coords": coords, "network": net, "couplings": couplings, "patient_edges": pat_edges,
            "sex_edges": sex_edges}


def _blocks(n_t: int, tr: float) -> np.ndarray:
    """Block design convolved with a simple gamma HRF."""
    t = np.arange(n_t) * tr
    box = ((t // 30.0) % 2 == 1).astype(np.float64)
    h = np.arange(0, 30, tr)
    hrf = (h**5) * np.exp(-h) / 120.0
    r = np.convolve(box, hrf)[:n_t]
    return (r - r.mean()) / (r.std() + 1e-9)


def synth_timeseries(d: dict, rng: np.random.Generator, *, state: str, patient: bool, sex: str, age: float,
                     n_t: int, tr: float, site_noise: float) -> np.ndarray:
    """T×M float32: latent network factors mixed by the state's coupling, AR(1), task blocks, noise."""
    net = d["network"]
    m = len(net)
    k = int(net.max()) + 1
    cov = d["couplings"][state] + np.eye(k) * 0.5
    w, v = np.linalg.eigh(cov)
    mix = v * np.sqrt(np.clip(w, 1e-3, None))
    lat = rng.standard_normal((n_t, k)) @ mix.T
    for t in range(1, n_t):  # AR(1) on the latent factors
        lat[t] = 0.5 * lat[t - 1] + np.sqrt(1 - 0.25) * lat[t]
    x = lat[:, net] * rng.uniform(0.8, 1.2, m) + 0.9 * rng.standard_normal((n_t, m))
    if state in TASK_NETWORKS:
        reg = _blocks(n_t, tr)
        for n in TASK_NETWORKS[state]:
            x[:, net == n] += 0.5 * reg[:, None]
    shared = rng.standard_normal(n_t)
    if patient and state == INFORMATIVE_STATE:
        for i, j in d["patient_edges"]:  # extra shared drive -> stronger coupling on these edges only
            s = rng.standard_normal(n_t)
            x[:, i] += 1.2 * s
            x[:, j] += 1.2 * s
    if sex == "M":
        for i, j in d["sex_edges"]:
            x[:, i] += 0.35 * shared
            x[:, j] += 0.35 * shared
    x *= 1.0 - 0.004 * (age - 45.0)  # weak age effect: lower signal amplitude
    x += site_noise * rng.standard_normal((n_t, m))
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    return x.astype(np.float32)
