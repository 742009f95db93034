"""Neural Collapse measurements (SCIENCE.md §4), as small pure functions on tensors.

Features are accumulated once per layer into `ClassStats` (class sizes, class means,
within-class residuals, in float64); every measure is then O(N·D·C) at most, never N × N.
Symbols follow the papers: H (N, D) features, y (N,) labels, C classes, mu_c class means,
mu_G the global mean, Sigma_W / Sigma_B within / between class covariances, W (C, D) the
classifier. Classes absent from `y` are left out of every measure (C counts present ones).

References: Papyan, Han & Donoho, PNAS 2020 (NC1–NC4); Galanti et al. 2022 (NCC accuracy,
CDNV, effective depth); Pan 2023, thesis §2.2–2.4 (cosine measures, Theorem 2.3.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

COSINE_KEYS = ("intra_min", "intra_mean", "inter_max", "inter_mean", "nc_score")
LAYER_KEYS = (COSINE_KEYS + tuple("raw_" + k for k in COSINE_KEYS)
              + ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_maxangle", "ncc_acc", "cdnv"))
CLASSIFIER_KEYS = ("nc3", "nc4", "train_loss", "train_acc", "alpha", "beta", "loss_floor", "loss_gap")


@dataclass(frozen=True)
class ClassStats:
    """Per-class sufficient statistics of one layer's features.

    Bulk (N, D) tensors keep the features' dtype (float32 in training: one pass each);
    class-level quantities are float64.
    """
    H: torch.Tensor        # (N, D) features
    y: torch.Tensor        # (N,) index into `classes`
    Y: torch.Tensor        # (N, C) one-hot of y, features' dtype
    classes: torch.Tensor  # (C,) original labels of the present classes
    n: torch.Tensor        # (C,) class sizes, float64
    mu_c: torch.Tensor     # (C, D) class means, float64
    mu_G: torch.Tensor     # (D,) global (sample) mean, float64
    R: torch.Tensor        # (N, D) within-class residuals h_i - mu_{y_i}

    @property
    def C(self) -> int:
        return len(self.classes)

    @property
    def N(self) -> int:
        return len(self.y)


def class_stats(H: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> ClassStats:
    """Class sizes and means of H (N, D) under labels y (N,); absent classes dropped."""
    if H.ndim != 2 or y.ndim != 1 or len(H) != len(y):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(H.shape)} and {tuple(y.shape)}")
    H = H.detach()
    if not H.is_floating_point():
        H = H.to(torch.float64)
    y = y.detach().to(device=H.device, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes or 0)
    classes = torch.nonzero(counts).flatten()                 # (C,)
    if len(classes) < 2:
        raise ValueError(f"need samples of at least 2 classes, got {len(classes)}")
    remap = torch.full((len(counts),), -1, dtype=torch.long, device=H.device)
    remap[classes] = torch.arange(len(classes), device=H.device)
    y_idx = remap[y]
    Y = F.one_hot(y_idx, len(classes)).to(H.dtype)            # (N, C)
    n = counts[classes].to(torch.float64)                     # (C,)
    mu_c = (Y.T @ H).to(torch.float64) / n[:, None]           # (C, D)
    mu_G = (n @ mu_c) / n.sum()                               # (D,)
    R = H - mu_c.to(H.dtype)[y_idx]                           # (N, D)
    return ClassStats(H, y_idx, Y, classes, n, mu_c, mu_G, R)


# ---------------------------------------------------------------- cosine measures (thesis)

def cosine_matrix(stats: ClassStats, center: bool = True) -> torch.Tensor:
    """(C, C) mean pairwise cosines: entry (c, c') = mean_{i in c, j in c'} cos(h_i, h_j).

    With u_i = (h_i - mu_G)/||h_i - mu_G|| (or h_i/||h_i|| when `center` is False) and
    u-bar_c the class mean of u, the entry is <u-bar_c, u-bar_c'> (thesis Lemma 2.4.4);
    the diagonal is intra_c (pairs i, j over the class, i = j included), the rest inter.
    A zero row has cosine 0 with everything.
    """
    X = stats.H - stats.mu_G.to(stats.H.dtype) if center else stats.H
    norms = X.norm(dim=1)                                     # (N,)
    inv = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(X.dtype).tiny), 0.0)
    u_bar = (stats.Y * inv[:, None]).T @ X                    # (C, D) class sums of u_i
    u_bar = u_bar.to(torch.float64) / stats.n[:, None]
    return u_bar @ u_bar.T


def cosine_summary(G: torch.Tensor, n: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """intra_min/mean, inter_max/mean, nc_score = intra_min - inter_max from G (C, C).

    Means are sample-weighted: intra by n_c, inter by n_c n_c' over c != c'.
    """
    intra = G.diagonal()
    off = ~torch.eye(len(G), dtype=torch.bool, device=G.device)
    pair_w = (n[:, None] * n[None, :])[off]
    out = {
        "intra_min": intra.min().item(),
        "intra_mean": ((intra * n).sum() / n.sum()).item(),
        "inter_max": G[off].max().item(),
        "inter_mean": ((G[off] * pair_w).sum() / pair_w.sum()).item(),
    }
    out["nc_score"] = out["intra_min"] - out["inter_max"]
    return {prefix + k: v for k, v in out.items()}


# ---------------------------------------------------------------- Papyan et al. (PNAS 2020)

def nc1(stats: ClassStats, rtol: float = 1e-10) -> float:
    """NC1 = Tr(Sigma_W Sigma_B^+) / C   (Papyan et al. 2020, Fig. 6).

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, Sigma_B = (1/C) sum_c
    (mu_c - mu_G)(mu_c - mu_G)^T. Sigma_B^+ keeps only the top C-1 eigenpairs (Sigma_B has
    rank <= C-1 for balanced classes) above rtol x the largest, so the trace is
    (1/C) sum_k lambda_k^-1 (1/N) sum_i <h_i - mu_{y_i}, v_k>^2 -- no D x D matrix is formed.
    If Sigma_B vanishes: 0 when Sigma_W does too, else inf.
    """
    M = (stats.mu_c - stats.mu_G) / math.sqrt(stats.C)        # (C, D): Sigma_B = M^T M
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)       # s descending
    lam = s ** 2
    keep = min(stats.C - 1, len(lam))
    lam, V = lam[:keep], Vh[:keep].T                          # (k,), (D, k)
    good = lam > rtol * lam[0] if keep and lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
    if not good.any():
        return 0.0 if stats.R.abs().max().item() == 0 else math.inf
    P = (stats.R @ V[:, good].to(stats.R.dtype)).to(torch.float64)  # (N, k) on B's eigenbasis
    return ((P ** 2).mean(dim=0) / lam[good]).sum().item() / stats.C


def nc2(stats: ClassStats) -> dict[str, float]:
    """Equinorm std_c||m_c||/mean_c||m_c||, equiangularity std_{c<c'} cos(m_c, m_c'), and
    mean_{c<c'} |cos(m_c, m_c') + 1/(C-1)|, with m_c = mu_c - mu_G (Papyan et al. 2020,
    Figs. 4-5). Standard deviations are over classes / pairs (ddof = 0)."""
    M = stats.mu_c - stats.mu_G                               # (C, D)
    norms = M.norm(dim=1)
    mean_norm = norms.mean()
    equinorm = (norms.std(correction=0) / mean_norm).item() if mean_norm > 0 else 0.0
    Mn = torch.where(norms[:, None] > 0, M / norms.clamp_min(1e-300)[:, None], 0.0)
    iu = torch.triu_indices(stats.C, stats.C, offset=1, device=M.device)
    cos = (Mn @ Mn.T)[iu[0], iu[1]]                           # (C(C-1)/2,)
    return {
        "nc2_equinorm": equinorm,
        "nc2_equiangular": cos.std(correction=0).item(),
        "nc2_maxangle": (cos + 1 / (stats.C - 1)).abs().mean().item(),
    }


def nc3(W: torch.Tensor, stats: ClassStats) -> float:
    """NC3 = || W/||W||_F - M^T/||M||_F ||_F^2 with M (D, C) the centred class means
    (Papyan et al. 2020, Fig. 7); W (C_all, D) is restricted to the present classes."""
    W = W.detach().to(torch.float64)[stats.classes]           # (C, D)
    M_T = stats.mu_c - stats.mu_G                             # (C, D)
    def unit(A: torch.Tensor) -> torch.Tensor:
        norm = A.norm()
        return A / norm if norm > 0 else A
    return ((unit(W) - unit(M_T)) ** 2).sum().item()


def ncc_predict(stats: ClassStats) -> torch.Tensor:
    """(N,) nearest-class-centre label (index into stats.classes), Euclidean:
    argmin_c ||h - mu_c||^2 = argmax_c <h, mu_c> - ||mu_c||^2 / 2."""
    scores = stats.H @ stats.mu_c.T.to(stats.H.dtype)                    # (N, C)
    scores = scores - 0.5 * (stats.mu_c ** 2).sum(dim=1).to(stats.H.dtype)
    return scores.argmax(dim=1)


def ncc_accuracy(stats: ClassStats, pred: torch.Tensor | None = None) -> float:
    """Accuracy of the NCC rule against the true labels (Galanti et al. 2022)."""
    pred = ncc_predict(stats) if pred is None else pred
    return (pred == stats.y).double().mean().item()


def nc4(stats: ClassStats, net_pred: torch.Tensor, ncc_pred: torch.Tensor | None = None) -> float:
    """NC4 = share of samples whose NCC label differs from the network's prediction
    (Papyan et al. 2020, Fig. 8). `net_pred` holds original labels (N,)."""
    ncc_pred = ncc_predict(stats) if ncc_pred is None else ncc_pred
    return (stats.classes[ncc_pred] != net_pred.to(stats.classes.device)).double().mean().item()


def cdnv(stats: ClassStats) -> float:
    """Class-distance normalised variance (Galanti et al. 2022): mean over c < c' of
    (Var_c + Var_c') / (2 ||mu_c - mu_c'||^2), Var_c = mean_{i in c} ||h_i - mu_c||^2.
    A pair with coincident means counts as inf."""
    sq = (stats.R ** 2).sum(dim=1, keepdim=True)              # (N, 1)
    var = (stats.Y.T @ sq).flatten().to(torch.float64) / stats.n          # (C,)
    dist2 = torch.cdist(stats.mu_c, stats.mu_c) ** 2          # (C, C)
    iu = torch.triu_indices(stats.C, stats.C, offset=1, device=dist2.device)
    num = var[iu[0]] + var[iu[1]]
    den = 2 * dist2[iu[0], iu[1]]
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), math.inf)
    return ratio.mean().item()


def effective_depth(ncc_accs: Sequence[float], depth: int, epsilon: float = 0.01) -> int:
    """epsilon-effective depth (thesis Def. 3.2.2, Galanti et al.): smallest block l in
    1..L-1 with NCC error 1 - ncc_acc_l <= epsilon, or L = `depth` if none."""
    for l, acc in enumerate(ncc_accs, start=1):
        if 1 - acc <= epsilon + 1e-12:
            return l
    return depth


# ---------------------------------------------------------------- Theorem 2.3.1

def loss_floor(alpha: float, beta: float, C: int, pi_max: float) -> float:
    """m = log(1 + (C-1) exp(-C/(C-1) * alpha * beta * sqrt(C * pi_max))): the least
    cross-entropy of unbiased features/weights with these norms (thesis Thm 2.3.1, with the
    sqrt(C pi_max) factor that makes it a floor for unbalanced classes, SCIENCE.md §4)."""
    x = C / (C - 1) * alpha * beta * math.sqrt(C * pi_max)
    return math.log1p((C - 1) * math.exp(-x))


def classifier_metrics(stats: ClassStats, W: torch.Tensor, b: torch.Tensor | None,
                       y: torch.Tensor, ncc_pred: torch.Tensor | None = None) -> dict[str, float]:
    """Last-layer measures: nc3, nc4, train_loss/acc of z = W h + b, alpha, beta, loss_floor,
    loss_gap = train_loss - loss_floor (>= 0 for any bias-free model)."""
    W64 = W.detach().to(torch.float64)                        # (C_all, D)
    logits = (stats.H @ W64.T.to(stats.H.dtype)).to(torch.float64)      # (N, C_all)
    if b is not None:
        logits = logits + b.detach().to(torch.float64)
    y = y.to(device=logits.device, dtype=torch.long)
    C_all = W64.shape[0]
    train_loss = F.cross_entropy(logits, y).item()
    net_pred = logits.argmax(dim=1)
    alpha = math.sqrt((stats.H * stats.H).sum(dim=1).to(torch.float64).mean().item())
    beta = W64.norm().item() / math.sqrt(C_all)
    pi_max = (stats.n.max() / stats.N).item()
    floor = loss_floor(alpha, beta, C_all, pi_max)
    return {
        "nc3": nc3(W, stats),
        "nc4": nc4(stats, net_pred, ncc_pred),
        "train_loss": train_loss,
        "train_acc": (net_pred == y).double().mean().item(),
        "alpha": alpha,
        "beta": beta,
        "loss_floor": floor,
        "loss_gap": train_loss - floor,
    }


# ---------------------------------------------------------------- one layer, all layers

def layer_metrics(stats: ClassStats, ncc_pred: torch.Tensor | None = None) -> dict[str, float]:
    """Every per-layer measure of SCIENCE.md §5 (unprefixed names)."""
    out = cosine_summary(cosine_matrix(stats, center=True), stats.n)
    out |= cosine_summary(cosine_matrix(stats, center=False), stats.n, prefix="raw_")
    out["nc1"] = nc1(stats)
    out |= nc2(stats)
    out["ncc_acc"] = ncc_accuracy(stats, ncc_pred)
    out["cdnv"] = cdnv(stats)
    return out


def layer_key(l: int, name: str) -> str:
    """Metric name of measure `name` at hidden block l (1-based): 'layer03/nc1'."""
    return f"layer{l:02d}/{name}"


def measure(features: Sequence[torch.Tensor] | "Iterable[torch.Tensor]", y: torch.Tensor,
            W: torch.Tensor | None = None, b: torch.Tensor | None = None,
            num_classes: int | None = None, depth: int | None = None,
            epsilon: float = 0.01) -> dict[str, float]:
    """All SCIENCE.md §5 measures for hidden features h_1..h_{L-1} (any iterable, consumed
    one layer at a time so only one layer is held): `layerNN/...` for each block, the last
    block's unprefixed, plus classifier measures when W (C, D_last) is given, and
    `effective_depth` (L = `depth`, default number of layers + 1)."""
    out: dict[str, float] = {}
    accs = []
    stats = pred = None
    for l, H in enumerate(features, start=1):
        stats = class_stats(H, y, num_classes)
        pred = ncc_predict(stats)
        layer = layer_metrics(stats, pred)
        out |= {layer_key(l, k): v for k, v in layer.items()}
        accs.append(layer["ncc_acc"])
    if stats is None:
        raise ValueError("no feature layers given")
    out |= layer
    if W is not None:
        if W.shape[1] != stats.H.shape[1]:
            raise ValueError(f"classifier W is {tuple(W.shape)} but the last layer has D={stats.H.shape[1]}")
        out |= classifier_metrics(stats, W, b, y, pred)
    out["effective_depth"] = float(effective_depth(accs, depth or len(accs) + 1, epsilon))
    return out
