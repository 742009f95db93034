"""Neural Collapse measurements (docs/science.md §4), as small pure functions on tensors.

Features are accumulated once per layer into `ClassStats`: two sweeps over H in row chunks
(`ClassStatsAccumulator`, fed batch by batch by `measure_stream` so that memory does not
grow with N, or over a whole (N, D) matrix by `class_stats` / `measure`) give per-class
sufficient statistics (class sizes and means, class means of the unit vectors,
within-class variances, the within-class covariance on the span of the centred class means)
plus each sample's nearest class centre. Every measure is then a small float64
function of those, never N × N; the bulk (N, D) work stays in the features' dtype.
Symbols follow the papers: H (N, D) features, y (N,) labels, C classes, mu_c class means,
mu_G the global mean, Sigma_W / Sigma_B within / between class covariances, W (C, D) the
classifier. Classes absent from `y` are left out of every measure (C counts present ones).

References: Papyan, Han & Donoho, PNAS 2020 (NC1–NC4); Galanti et al. 2022 (NCC accuracy,
CDNV, effective depth); Pan 2023, thesis §2.2–2.4 (cosine measures, Theorem 2.3.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import fused

# the measures' plain names and `layerNN/<name>` live with the rest of the MLflow layout
from .schema import CLASSIFIER_KEYS, COSINE_KEYS, LAYER_KEYS, layer_key  # noqa: F401 - re-exported

# Rows per sweep step on CPU: about 2 MiB of features, so a chunk's temporaries stay in
# cache instead of allocating and streaming whole (N, D) arrays (1-4 MiB measured best on
# the benchmark machine; smaller chunks pay per-op dispatch, larger ones miss cache).
CHUNK_BYTES = 1 << 21


@dataclass(frozen=True)
class ClassifierSums:
    """What the last layer's second sweep adds up for the classifier z = W h + b, so that no
    (N, C) logits are kept: summed cross-entropy, correct predictions, and disagreements
    between the network's prediction and the nearest class centre (NC4)."""
    loss_sum: float
    correct: int
    disagree: int


@dataclass(frozen=True)
class ClassStats:
    """Per-class sufficient statistics of one layer's features (float64 unless noted).

    `H`, `y` and `ncc` are the per-sample arrays of the in-memory path (`class_stats`); the
    streamed path (`ClassStatsAccumulator`, `measure_stream`) leaves them None and carries
    `ncc_hits` and `classifier` sums instead."""
    H: torch.Tensor | None   # (N, D) the features themselves (a reference, for the logits)
    y: torch.Tensor | None   # (N,) index into `classes`
    classes: torch.Tensor    # (C,) original labels of the present classes
    n: torch.Tensor          # (C,) class sizes
    mu_c: torch.Tensor       # (C, D) class means
    mu_G: torch.Tensor       # (D,) global (sample) mean
    u_bar: torch.Tensor      # (C, D) class means of u_i = (h_i - mu_G)/||h_i - mu_G||
    u_bar_raw: torch.Tensor  # (C, D) class means of h_i/||h_i||
    var_c: torch.Tensor      # (C,) Var_c = mean over class c of ||h_i - mu_c||^2
    Q: torch.Tensor          # (D, r) orthonormal basis of a subspace holding every mu_c - mu_G
    Sigma_W_Q: torch.Tensor  # (r, r) Q^T Sigma_W Q
    ncc: torch.Tensor | None  # (N,) nearest-class-centre label, index into `classes`
    sq_norm_mean: float      # (1/N) sum_i ||h_i||^2
    ncc_hits: int = 0        # samples whose nearest class centre is their own class
    classifier: ClassifierSums | None = None

    @property
    def C(self) -> int:
        return len(self.classes)

    @property
    def N(self) -> int:
        return int(self.n.sum().item())

    @property
    def D(self) -> int:
        return self.mu_c.shape[1]

    @property
    def M(self) -> torch.Tensor:
        """(C, D) centred class means m_c = mu_c - mu_G."""
        return self.mu_c - self.mu_G


class ClassStatsAccumulator:
    """`ClassStats` of one layer built from its features fed batch by batch, in two sweeps
    (every batch to `sweep1`, then `finish_sweep1`, then every batch again to `sweep2`, then
    `result`), so the state is O(C D + r^2) whatever N is.

    Sweep 1 sums h_i - h_0 per class (shifted by the first sample: exact for constant
    features, better conditioned far from the origin) and h_i/||h_i||. Sweep 2 forms, chunk
    by chunk, x_i = h_i - mu_G and r_i = h_i - mu_{y_i} and keeps only their class sums,
    ||r_i||^2 and the projections Q^T r_i, which give Sigma_W on span(Q) and the
    nearest-class-centre rule: argmin_c ||h_i - mu_c||^2 = argmax_c <x_i, m_c> - ||m_c||^2/2
    with <x_i, m_c> = <Q^T r_i, Q^T m_c> + <m_{y_i}, m_c> (no cancellation far from 0).
    With a classifier W (C_all, D) (and bias b) attached by `set_classifier` before sweep 2,
    sweep 2 also sums the cross-entropy, correct predictions and NC4 disagreements.

    `counts` (C_all,) are the class sizes of the whole set (bincount of its labels): classes
    with none are left out, as in every measure. Batches carry the original labels."""

    def __init__(self, counts: torch.Tensor) -> None:
        counts = counts.detach().to(torch.long)
        classes = torch.nonzero(counts).flatten()             # (C,)
        if len(classes) < 2:
            raise ValueError(f"need samples of at least 2 classes, got {len(classes)}")
        self.classes = classes
        self.remap = torch.full((len(counts),), -1, dtype=torch.long, device=counts.device)
        self.remap[classes] = torch.arange(len(classes), device=counts.device)
        self.n = counts[classes].to(torch.float64)            # (C,)
        self.N = int(counts.sum())
        self.C = len(classes)
        self.h0 = None
        self.W = self.b = None
        self.loss_sum, self.correct, self.disagree, self.ncc_hits = 0.0, 0, 0, 0

    def state_numel(self) -> int:
        """Numbers held between batches (every tensor attribute): O(C D + r^2), not O(N)."""
        return sum(v.numel() for v in vars(self).values() if isinstance(v, torch.Tensor))

    def _labels(self, H: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H = H.detach()
        if not H.is_floating_point():
            H = H.to(torch.float64)
        if H.ndim != 2 or y.ndim != 1 or len(H) != len(y):
            raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(H.shape)} and {tuple(y.shape)}")
        return H, self.remap.to(H.device)[y.detach().to(device=H.device, dtype=torch.long)]

    def sweep1(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch H (B, D) with labels y (B,) to the first sweep."""
        H, y = self._labels(H, y)
        C, D = self.C, H.shape[1]
        if self.h0 is None:
            f64 = dict(dtype=torch.float64, device=H.device)
            self.h0 = H[0].clone()                            # (D,) the shift, in H's dtype
            self.S = torch.zeros(2 * C, D, **f64)             # (2C, D)
            self.inv_sum = torch.zeros(C, **f64)              # (C,) sum of 1/||h_i||
            self.sq_sum = torch.zeros((), **f64)
        if fused.usable(H):                                   # one C loop over the rows
            fused.sweep1(H, y, C, self.h0, self.S, self.inv_sum, self.sq_sum)
            return
        h0 = self.h0
        # per-sample (B,) work once for the batch; only the (rows, D) products go by chunk
        norms = torch.linalg.vector_norm(H, dim=1)            # (B,)
        inv = _inverse(norms)
        Y = F.one_hot(y, C).to(H.dtype)                       # (B, C)
        AT = torch.cat([Y, Y * inv[:, None]], dim=1).T.contiguous()   # (2C, B)
        buf = None
        for rows in _chunks(H):
            Hc = H[rows]
            buf = _buffer(buf, Hc)
            self.S += (AT[:, rows] @ torch.sub(Hc, h0, out=buf[:len(Hc)])).to(torch.float64)
        self.inv_sum += torch.bincount(y, weights=inv.to(torch.float64), minlength=C)
        self.sq_sum += (norms.to(torch.float64) ** 2).sum()

    def finish_sweep1(self) -> None:
        """Class and global means from the first sweep; set up the second."""
        C, n, S = self.C, self.n, self.S
        dtype = self.h0.dtype
        h0 = self.h0.to(torch.float64)
        self.mu_c = h0 + S[:C] / n[:, None]                   # (C, D)
        self.mu_G = h0 + S[:C].sum(dim=0) / self.N            # (D,)
        self.u_bar_raw = (S[C:] + self.inv_sum[:, None] * h0) / n[:, None]  # (C, D)
        del self.S
        M = self.mu_c - self.mu_G                             # (C, D)
        self.Q = torch.linalg.qr(M.T).Q                       # (D, r), r = min(C, D)
        self.MQ, self.MM = (M @ self.Q).contiguous(), (M @ M.T).contiguous()  # (C, r), (C, C)
        self.half = 0.5 * (M ** 2).sum(dim=1)                 # (C,)
        self.mu_G_, self.M_, self.Q_ = self.mu_G.to(dtype), M.to(dtype), self.Q.to(dtype)
        self.mu_c_, self.QT_ = self.mu_c.to(dtype).contiguous(), self.Q.T.to(dtype).contiguous()  # fused sweep
        f64 = dict(dtype=torch.float64, device=M.device)
        r = self.Q.shape[1]
        self.U = torch.zeros(C, M.shape[1], **f64)            # (C, D) class sums of u_i
        self.var = torch.zeros(C, **f64)                      # (C,) class sums of ||r_i||^2
        self.SW = torch.zeros(r, r, **f64)                    # (r, r) sum of Q^T r_i r_i^T Q

    def set_classifier(self, W: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Sum classifier quantities of z = W h + b in sweep 2 (W (C_all, D), b (C_all,));
        call it after `finish_sweep1`."""
        D = self.mu_c.shape[1]
        if W.shape[1] != D:
            raise ValueError(f"classifier W is {tuple(W.shape)} but the last layer has D={D}")
        self.W = W.detach().to(torch.float64)
        self.b = None if b is None else b.detach().to(torch.float64)

    def sweep2(self, H: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add a batch to the second sweep; returns its (B,) nearest-class-centre labels
        (indices into `classes`)."""
        H, y = self._labels(H, y)
        if fused.usable(H):                                   # one C loop over the rows
            ncc = fused.sweep2(H, y, self.mu_G_, self.mu_c_, self.QT_, self.MQ, self.MM, self.half,
                               self.U, self.var, self.SW)
        else:
            P = self._sweep2_chunks(H, y)                     # (B, r) Q^T r_i
            self.SW += P.T @ P
            ncc = (P @ self.MQ.T + self.MM.index_select(0, y) - self.half).argmax(dim=1)
        if self.W is not None:
            self._classify(H, y, ncc)
        self.ncc_hits += int((ncc == y).sum())
        return ncc

    def _sweep2_chunks(self, H: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sweep 2's per-row work as torch operations on row chunks (GPU, or no fused build):
        adds to U and var, returns P (B, r) = Q^T r_i in float64."""
        C, B = self.C, len(H)
        Y = F.one_hot(y, C).to(H.dtype)                       # (B, C)
        r_norm = torch.empty(B, dtype=H.dtype, device=H.device)          # ||r_i||
        P = torch.empty(B, self.Q_.shape[1], dtype=H.dtype, device=H.device)  # Q^T r_i
        buf = gathered = None
        for rows in _chunks(H):
            Hc = H[rows]
            buf, gathered = _buffer(buf, Hc), _buffer(gathered, Hc)
            X = torch.sub(Hc, self.mu_G_, out=buf[:len(Hc)])  # (b, D) x_i
            inv = _inverse(torch.linalg.vector_norm(X, dim=1))
            self.U += ((Y[rows] * inv[:, None]).T @ X).to(torch.float64)
            M_y = torch.index_select(self.M_, 0, y[rows], out=gathered[:len(Hc)])   # (b, D) m_{y_i}
            R = X.sub_(M_y)                                   # (b, D) r_i, in place of x_i
            torch.linalg.vector_norm(R, dim=1, out=r_norm[rows])
            torch.mm(R, self.Q_, out=P[rows])
        self.var += torch.bincount(y, weights=r_norm.to(torch.float64) ** 2, minlength=C)
        return P.to(torch.float64)

    def _classify(self, H: torch.Tensor, y: torch.Tensor, ncc: torch.Tensor) -> None:
        logits = (H @ self.W.T.to(H.dtype)).to(torch.float64)            # (B, C_all)
        if self.b is not None:
            logits = logits + self.b
        labels = self.classes[y]
        net_pred = logits.argmax(dim=1)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        self.correct += int((net_pred == labels).sum())
        self.disagree += int((self.classes[ncc] != net_pred).sum())

    def result(self, H: torch.Tensor | None = None, y: torch.Tensor | None = None,
               ncc: torch.Tensor | None = None) -> ClassStats:
        """The statistics; `H`, remapped `y` and `ncc` are attached by the in-memory path."""
        sums = None if self.W is None else ClassifierSums(self.loss_sum, self.correct, self.disagree)
        return ClassStats(H, y, self.classes, self.n, self.mu_c, self.mu_G, self.U / self.n[:, None],
                          self.u_bar_raw, self.var / self.n, self.Q, self.SW / self.N, ncc,
                          (self.sq_sum / self.N).item(), self.ncc_hits, sums)


def class_stats(H: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> ClassStats:
    """Sufficient statistics of H (N, D) under labels y (N,); absent classes dropped.
    The two sweeps of `ClassStatsAccumulator` over H in row chunks, keeping H, y and the
    (N,) nearest-class-centre labels for the classifier measures."""
    if H.ndim != 2 or y.ndim != 1 or len(H) != len(y):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(H.shape)} and {tuple(y.shape)}")
    H = H.detach()
    if not H.is_floating_point():
        H = H.to(torch.float64)
    y = y.detach().to(device=H.device, dtype=torch.long)
    acc = ClassStatsAccumulator(torch.bincount(y, minlength=num_classes or 0))
    acc.sweep1(H, y)
    acc.finish_sweep1()
    ncc = acc.sweep2(H, y)
    return acc.result(H, acc.remap[y], ncc)


def _chunks(H: torch.Tensor) -> Iterator[slice]:
    """Row slices of about CHUNK_BYTES each on CPU; one slice on a GPU."""
    N, D = H.shape
    step = N if H.device.type != "cpu" else max(1, CHUNK_BYTES // max(1, D * H.element_size()))
    return (slice(start, start + step) for start in range(0, N, step))


def _buffer(buf: torch.Tensor | None, Hc: torch.Tensor) -> torch.Tensor:
    """A scratch (rows, D) array for a chunk like Hc, reused from chunk to chunk."""
    if buf is None or len(buf) < len(Hc):
        buf = torch.empty_like(Hc, memory_format=torch.contiguous_format)
    return buf


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """1/||v||, and 0 for a zero row (its cosine with everything is 0)."""
    return torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


# ---------------------------------------------------------------- cosine measures (thesis)

def cosine_matrix(stats: ClassStats, center: bool = True) -> torch.Tensor:
    """(C, C) mean pairwise cosines: entry (c, c') = mean_{i in c, j in c'} cos(h_i, h_j).

    With u_i = (h_i - mu_G)/||h_i - mu_G|| (or h_i/||h_i|| when `center` is False) and
    u-bar_c the class mean of u, the entry is <u-bar_c, u-bar_c'> (thesis Lemma 2.4.4);
    the diagonal is intra_c (pairs i, j over the class, i = j included), the rest inter.
    A zero row has cosine 0 with everything.
    """
    u_bar = stats.u_bar if center else stats.u_bar_raw        # (C, D)
    return u_bar @ u_bar.T


def cosine_summary(G: torch.Tensor, n: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """intra_min/mean, inter_max/mean, nc_score = intra_min - inter_max from G (C, C).

    Means are sample-weighted: intra by n_c, inter by n_c n_c' over c != c'. (C x C numbers:
    numpy on the host, a few microseconds, where torch would dispatch a dozen operations.)
    """
    G, n = _host(G), _host(n)
    intra = np.diagonal(G)
    off = ~np.eye(len(G), dtype=bool)
    inter, pair_w = G[off], np.outer(n, n)[off]
    out = {
        "intra_min": float(intra.min()),
        "intra_mean": float((intra * n).sum() / n.sum()),
        "inter_max": float(inter.max()),
        "inter_mean": float((inter * pair_w).sum() / pair_w.sum()),
    }
    out["nc_score"] = out["intra_min"] - out["inter_max"]
    return {prefix + k: v for k, v in out.items()}


def _host(t: torch.Tensor) -> np.ndarray:
    """A small tensor as a float64 numpy array on the host."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


# ---------------------------------------------------------------- Papyan et al. (PNAS 2020)

def nc1(stats: ClassStats, rtol: float = 1e-10) -> float:
    """NC1 = Tr(Sigma_W Sigma_B^+) / C   (Papyan et al. 2020, Fig. 6).

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T, Sigma_B = (1/C) sum_c
    (mu_c - mu_G)(mu_c - mu_G)^T. Sigma_B^+ keeps only the top C-1 eigenpairs (Sigma_B has
    rank <= C-1: sum_c n_c (mu_c - mu_G) = 0) above rtol x the largest. Those eigenvectors
    lie in span(Q), so the trace only needs Q^T Sigma_W Q (r x r): no D x D matrix.
    If Sigma_B vanishes: 0 when Sigma_W does too, else inf.
    """
    MQ = stats.M @ stats.Q / math.sqrt(stats.C)               # (C, r): Q^T Sigma_B Q = MQ^T MQ
    _, s, Vh = torch.linalg.svd(MQ, full_matrices=False)      # s descending
    lam = s ** 2
    keep = min(stats.C - 1, len(lam))
    lam, V = lam[:keep], Vh[:keep].T                          # (k,), (r, k) in Q's coordinates
    good = lam > rtol * lam[0] if keep and lam[0] > 0 else torch.zeros_like(lam, dtype=torch.bool)
    if not good.any():
        return 0.0 if (stats.var_c == 0).all() else math.inf
    V = V[:, good]
    return ((V.T @ stats.Sigma_W_Q @ V).diagonal() / lam[good]).sum().item() / stats.C


def nc2(stats: ClassStats) -> dict[str, float]:
    """Equinorm std_c||m_c||/mean_c||m_c||, equiangularity std_{c<c'} cos(m_c, m_c'), and
    mean_{c<c'} |cos(m_c, m_c') + 1/(C-1)|, with m_c = mu_c - mu_G (Papyan et al. 2020,
    Figs. 4-5). Standard deviations are over classes / pairs (ddof = 0)."""
    M = _host(stats.M)                                        # (C, D)
    norms = np.linalg.norm(M, axis=1)
    mean_norm = norms.mean()
    equinorm = float(norms.std() / mean_norm) if mean_norm > 0 else 0.0
    Mn = M / np.where(norms > 0, norms, np.inf)[:, None]      # a zero m_c: a zero row
    cos = (Mn @ Mn.T)[np.triu_indices(stats.C, k=1)]          # (C(C-1)/2,)
    return {
        "nc2_equinorm": equinorm,
        "nc2_equiangular": float(cos.std()),
        "nc2_maxangle": float(np.abs(cos + 1 / (stats.C - 1)).mean()),
    }


def nc3(W: torch.Tensor, stats: ClassStats) -> float:
    """NC3 = || W/||W||_F - M^T/||M||_F ||_F^2 with M (D, C) the centred class means
    (Papyan et al. 2020, Fig. 7); W (C_all, D) is restricted to the present classes."""
    W = W.detach().to(torch.float64)[stats.classes]           # (C, D)
    M_T = stats.M                                             # (C, D)
    def unit(A: torch.Tensor) -> torch.Tensor:
        norm = A.norm()
        return A / norm if norm > 0 else A
    return ((unit(W) - unit(M_T)) ** 2).sum().item()


def ncc_predict(stats: ClassStats) -> torch.Tensor:
    """(N,) nearest-class-centre label (index into stats.classes), Euclidean:
    argmin_c ||h - mu_c||^2, computed in `class_stats`' second sweep."""
    return stats.ncc


def ncc_accuracy(stats: ClassStats, pred: torch.Tensor | None = None) -> float:
    """Accuracy of the NCC rule against the true labels (Galanti et al. 2022)."""
    pred = ncc_predict(stats) if pred is None else pred
    if pred is None:                                          # streamed: counted in sweep 2
        return stats.ncc_hits / stats.N
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
    var, mu_c = _host(stats.var_c), _host(stats.mu_c)         # (C,), (C, D)
    i, j = np.triu_indices(stats.C, k=1)
    dist2 = ((mu_c[i] - mu_c[j]) ** 2).sum(axis=1)            # explicit: a Gram shortcut loses digits
    num = var[i] + var[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(dist2 > 0, num / (2 * dist2), math.inf)
    return float(ratio.mean())


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
    sqrt(C pi_max) factor that makes it a floor for unbalanced classes, docs/science.md §4)."""
    x = C / (C - 1) * alpha * beta * math.sqrt(C * pi_max)
    return math.log1p((C - 1) * math.exp(-x))


def classifier_metrics(stats: ClassStats, W: torch.Tensor, b: torch.Tensor | None,
                       y: torch.Tensor, ncc_pred: torch.Tensor | None = None) -> dict[str, float]:
    """Last-layer measures: nc3, nc4, train_loss/acc of z = W h + b, alpha, beta, loss_floor,
    loss_gap = train_loss - loss_floor (>= 0 for any bias-free model). Streamed statistics
    (no `stats.H`) bring the per-sample parts summed (`stats.classifier`); `y` is unused then."""
    W64 = W.detach().to(torch.float64)                        # (C_all, D)
    C_all = W64.shape[0]
    if stats.H is None:
        sums = stats.classifier
        if sums is None:
            raise ValueError("streamed statistics carry no classifier sums: set_classifier was not called")
        train_loss, train_acc, nc4_ = sums.loss_sum / stats.N, sums.correct / stats.N, sums.disagree / stats.N
    else:
        logits = (stats.H @ W64.T.to(stats.H.dtype)).to(torch.float64)  # (N, C_all)
        if b is not None:
            logits = logits + b.detach().to(torch.float64)
        y = y.to(device=logits.device, dtype=torch.long)
        train_loss = F.cross_entropy(logits, y).item()
        net_pred = logits.argmax(dim=1)
        train_acc = (net_pred == y).double().mean().item()
        nc4_ = nc4(stats, net_pred, ncc_pred)
    alpha = math.sqrt(stats.sq_norm_mean)
    beta = W64.norm().item() / math.sqrt(C_all)
    pi_max = (stats.n.max() / stats.N).item()
    floor = loss_floor(alpha, beta, C_all, pi_max)
    return {
        "nc3": nc3(W, stats),
        "nc4": nc4_,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "alpha": alpha,
        "beta": beta,
        "loss_floor": floor,
        "loss_gap": train_loss - floor,
    }


# ---------------------------------------------------------------- one layer, all layers

def layer_metrics(stats: ClassStats, ncc_pred: torch.Tensor | None = None) -> dict[str, float]:
    """Every per-layer measure of docs/science.md §5 (unprefixed names)."""
    out = cosine_summary(cosine_matrix(stats, center=True), stats.n)
    out |= cosine_summary(cosine_matrix(stats, center=False), stats.n, prefix="raw_")
    out["nc1"] = nc1(stats)
    out |= nc2(stats)
    out["ncc_acc"] = ncc_accuracy(stats, ncc_pred)
    out["cdnv"] = cdnv(stats)
    return out


def measure(features: Iterable[torch.Tensor], y: torch.Tensor,
            W: torch.Tensor | None = None, b: torch.Tensor | None = None,
            num_classes: int | None = None, depth: int | None = None,
            epsilon: float = 0.01) -> dict[str, float]:
    """All docs/science.md §5 measures for hidden features h_1..h_{L-1} (any iterable, consumed
    one layer at a time so only one layer is held): `layerNN/...` for each block, the last
    block's unprefixed, plus classifier measures when W (C, D_last) is given, and
    `effective_depth` (L = `depth`, default number of layers + 1). Plain names: MLflow gets
    them as `schema.mlflow_metrics` renames them (headline/..., last_block/...)."""
    return summarise((class_stats(H, y, num_classes) for H in features), y, W, b, depth, epsilon)


def summarise(layers: Iterable[ClassStats], y: torch.Tensor | None, W: torch.Tensor | None = None,
              b: torch.Tensor | None = None, depth: int | None = None,
              epsilon: float = 0.01) -> dict[str, float]:
    """The §5 dict from every layer's statistics, first to last (consumed one at a time)."""
    out: dict[str, float] = {}
    accs = []
    stats = None
    for l, stats in enumerate(layers, start=1):
        layer = layer_metrics(stats, stats.ncc)
        out |= {layer_key(l, k): v for k, v in layer.items()}
        accs.append(layer["ncc_acc"])
    if stats is None:
        raise ValueError("no feature layers given")
    out |= layer
    if W is not None:
        if W.shape[1] != stats.D:
            raise ValueError(f"classifier W is {tuple(W.shape)} but the last layer has D={stats.D}")
        out |= classifier_metrics(stats, W, b, y, stats.ncc)
    out["effective_depth"] = float(effective_depth(accs, depth or len(accs) + 1, epsilon))
    return out


@torch.no_grad()
def measure_stream(model, X: torch.Tensor, y: torch.Tensor, W: torch.Tensor | None = None,
                   b: torch.Tensor | None = None, num_classes: int | None = None,
                   depth: int | None = None, epsilon: float = 0.01, bn_stats="exact",
                   batch_size: int = 1024) -> dict[str, float]:
    """`measure(model.hidden(X, bn_stats), y, W, b, ...)` with memory O(batch + layers C D)
    instead of O(N D): X (N, ...) goes through `model.hidden` `batch_size` rows at a time.

    With bn_stats="exact", `models.exact_bn_statistics` first finds every BN's exact
    whole-set statistics (one pass per BN); then pass A feeds every layer's features to
    sweep 1 of its `ClassStatsAccumulator` and pass B, once the means are known, to sweep 2
    (the last layer also sums the classifier's loss, accuracy and NC4). The model should be
    in eval mode (for bn_stats="running"). Agrees with `measure` to float rounding."""
    from .models import FixedBatchNorm, batches, exact_bn_statistics
    if bn_stats == "exact" and batch_size < len(X):          # one batch: train-mode BN is exact
        bn_stats = FixedBatchNorm(exact_bn_statistics(model, X, batch_size))
    y = y.detach().to(device=X.device, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes or 0)
    accumulators: list[ClassStatsAccumulator] = []
    for rows in batches(len(X), batch_size):                 # pass A
        for l, H in enumerate(model.hidden(X[rows], bn_stats)):
            if l == len(accumulators):
                accumulators.append(ClassStatsAccumulator(counts))
            accumulators[l].sweep1(H, y[rows])
    if not accumulators:
        raise ValueError("no feature layers given")
    for acc in accumulators:
        acc.finish_sweep1()
    if W is not None:
        accumulators[-1].set_classifier(W, b)
    for rows in batches(len(X), batch_size):                 # pass B
        for acc, H in zip(accumulators, model.hidden(X[rows], bn_stats)):
            acc.sweep2(H, y[rows])
    return summarise((acc.result() for acc in accumulators), y, W, b, depth, epsilon)
