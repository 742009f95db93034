"""The measures' two sweeps over a layer's features as one C loop each, on CPU, and the
exact BN statistics taken in the ReLU's pass.

`metrics.ClassStatsAccumulator` needs, per sample, a handful of quantities of one feature row
h_i (D,): its norm, its shift from a reference, its distance from mu_G and from its class
mean, the projections of that residual. As torch operations each is a pass over a (rows, D)
chunk, about ten of them per sweep; at the thesis' size those passes cost ~10 ms a block,
half again of the block's forward (study/bench.py, ratio (a)). Here each sweep reads every
row once and does all of its work while the row is in L1, accumulating in float64; and
`relu_moments` gives an MLP block's BN the mean and variance of its input in the same pass
as the ReLU before it (models.Block.exact), where train-mode BN would read it twice more.

The source below is compiled once per machine kind with the system's C compiler (gcc or cc,
-O3 for the host CPU; under a second) into `~/.cache/nc-study/` (or `$XDG_CACHE_HOME`),
keyed by the source, the compiler and the CPU's instruction sets, so nodes of a cluster that
share a home folder each load a build their CPU runs. No compiler, a failed build, a GPU
tensor, a dtype other than float32/float64 or NC_STUDY_FUSED=0: the torch operations run
instead (same results to float rounding; tests/test_fused.py compares the two).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from string import Template

import torch

log = logging.getLogger(__name__)

ENV_SWITCH = "NC_STUDY_FUSED"      # "0" turns the fused sweeps off (benchmarks, comparisons)

# $T: the features' C type (the row work is done in it: a float32 row's in 8-wide float
# vectors, each row's sums finished in double), $S: its suffix. Sizes are int64; y holds class
# indices in [0, C). Every sum over rows is kept in double.
_KERNELS = Template(r"""
void sweep1_$S(const $T *H, const int64_t *y, int64_t N, int64_t D, int64_t C, const $T *h0,
               double *S, double *inv_sum, double *sq_sum) {
    /* S (2C, D): rows c sum h_i - h0, rows C + c sum (h_i - h0)/||h_i|| over class c */
    double total = 0.0;
    for (int64_t i = 0; i < N; i++) {
        const $T *h = H + i * D;
        $T sq = 0;
        #pragma omp simd reduction(+:sq)
        for (int64_t j = 0; j < D; j++) sq += h[j] * h[j];
        double inv = inverse(sq);
        int64_t c = y[i];
        double *s = S + c * D, *t = S + (C + c) * D;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) {
            double d = h[j] - h0[j];
            s[j] += d;
            t[j] += inv * d;
        }
        inv_sum[c] += inv;
        total += sq;
    }
    *sq_sum += total;
}

void sweep2_$S(const $T *H, const int64_t *y, int64_t N, int64_t D, int64_t C, int64_t R,
               const $T *mu_G, const $T *mu_c, const $T *QT, const double *MQ, const double *MM,
               const double *half, double *U, double *var, double *SW, int64_t *ncc, $T *r) {
    /* x_i = h_i - mu_G, r_i = h_i - mu_{y_i}, p_i = QT r_i (R,):
       U (C, D) += x_i/||x_i||, var (C,) += ||r_i||^2, SW (R, R) += p_i p_i^T, and ncc[i] the
       nearest class centre, argmax_c <p_i, MQ[c]> + MM[y_i, c] - half[c] (first of ties).
       r (D,) is scratch. r_i is taken from h_i itself, not x_i - m_c: near its class mean
       the difference is exact (Sterbenz) */
    double p[R > 0 ? R : 1];
    for (int64_t i = 0; i < N; i++) {
        const $T *h = H + i * D;
        int64_t c = y[i];
        const $T *m = mu_c + c * D;
        $T sx = 0, sr = 0;
        #pragma omp simd reduction(+:sx, sr)
        for (int64_t j = 0; j < D; j++) {
            $T x = h[j] - mu_G[j], d = h[j] - m[j];
            r[j] = d;
            sx += x * x;
            sr += d * d;
        }
        double inv = inverse(sx);
        double *u = U + c * D;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) u[j] += inv * (double)(h[j] - mu_G[j]);
        var[c] += sr;
        project_$S(r, QT, D, R, p);
        for (int64_t a = 0; a < R; a++)
            for (int64_t b = 0; b < R; b++) SW[a * R + b] += p[a] * p[b];
        int64_t best = 0;
        double top = -INFINITY;
        for (int64_t k = 0; k < C; k++) {
            double score = MM[c * C + k] - half[k];
            for (int64_t a = 0; a < R; a++) score += p[a] * MQ[k * R + a];
            if (score > top) { top = score; best = k; }
        }
        ncc[i] = best;
    }
}
""")

_MOMENTS = Template(r"""
void relu_moments_$S($T *X, int64_t N, int64_t D, double *mean, double *var, $T *shift, $T *s1, $T *s2) {
    /* X (N, D) through ReLU in place (NaN kept, as torch's); mean, var (D,) its columns' mean
       and biased variance. Sums of v - shift (shift: the ReLU'd mean of the first block of
       rows, close to the column's mean) are taken in $T over blocks of BLOCK rows, added up in
       double. shift, s1, s2 (D,) are scratch. */
    enum { BLOCK = 64 };
    int64_t first = N < BLOCK ? N : BLOCK;
    for (int64_t j = 0; j < D; j++) { mean[j] = 0.0; var[j] = 0.0; shift[j] = 0; }
    for (int64_t i = 0; i < first; i++) {
        const $T *row = X + i * D;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) shift[j] += row[j] < 0 ? 0 : row[j];
    }
    #pragma omp simd
    for (int64_t j = 0; j < D; j++) shift[j] /= ($T)first;
    for (int64_t start = 0; start < N; start += BLOCK) {
        int64_t stop = start + BLOCK < N ? start + BLOCK : N;
        for (int64_t j = 0; j < D; j++) { s1[j] = 0; s2[j] = 0; }
        for (int64_t i = start; i < stop; i++) {
            $T *row = X + i * D;
            #pragma omp simd
            for (int64_t j = 0; j < D; j++) {
                $T v = row[j] < 0 ? 0 : row[j];
                row[j] = v;
                $T d = v - shift[j];
                s1[j] += d;
                s2[j] += d * d;
            }
        }
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) { mean[j] += s1[j]; var[j] += s2[j]; }
    }
    for (int64_t j = 0; j < D; j++) {
        double m = mean[j] / N, v = var[j] / N - m * m;
        mean[j] = shift[j] + m;
        var[j] = v > 0.0 ? v : 0.0;
    }
}
""")

_PROJECT = Template(r"""
static void project_$S(const $T *r, const $T *QT, int64_t D, int64_t R, double *p) {
    /* p[k] = r . QT[k], four dot products at a time so their sums do not wait on each other */
    int64_t k = 0;
    for (; k + 4 <= R; k += 4) {
        const $T *q0 = QT + k * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
        $T a = 0, b = 0, c = 0, d = 0;
        #pragma omp simd reduction(+:a, b, c, d)
        for (int64_t j = 0; j < D; j++) {
            a += r[j] * q0[j]; b += r[j] * q1[j]; c += r[j] * q2[j]; d += r[j] * q3[j];
        }
        p[k] = a; p[k + 1] = b; p[k + 2] = c; p[k + 3] = d;
    }
    for (; k < R; k++) {
        const $T *q = QT + k * D;
        $T a = 0;
        #pragma omp simd reduction(+:a)
        for (int64_t j = 0; j < D; j++) a += r[j] * q[j];
        p[k] = a;
    }
}
""")

_COMMON = r"""
#include <math.h>
#include <stdint.h>

static inline double inverse(double sq) {   /* 1/||v|| from ||v||^2, and 0 for a zero row */
    return sq > 0.0 ? 1.0 / sqrt(sq) : 0.0;
}
"""

SOURCE = _COMMON + "".join(part.substitute(T=T, S=S) for T, S in (("float", "f32"), ("double", "f64"))
                           for part in (_PROJECT, _KERNELS, _MOMENTS))
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nc-study"


def _cpu_features() -> str:
    """The host CPU's instruction-set flags (what -march=native builds for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> tuple[str, str] | None:
    """(path, version line) of the system's C compiler, or None."""
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        path = name and shutil.which(name)
        if path:
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                continue
            if out.returncode == 0:
                return path, (out.stdout.splitlines() or [""])[0]
    return None


def _build(cc: str, target: Path) -> None:
    """Compile SOURCE into the shared library `target` (written whole, then moved in place,
    so racing processes never load a half-written file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "sweeps.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        base = [cc, "-O3", "-fopenmp-simd", "-fPIC", "-shared", "-o", str(out), str(src), "-lm"]
        for arch in (["-march=native"], []):       # some compilers refuse -march=native (arm64 clang)
            done = subprocess.run(base[:1] + arch + base[1:], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, target)
                return
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled sweeps, built on first use; None where they cannot be (said once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    found = _compiler()
    if found is None:
        log.info("no C compiler found: the NC measures' sweeps use torch operations")
        return None
    cc, version = found
    key = hashlib.sha256("\n".join([SOURCE, version, platform.machine(), _cpu_features()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"sweeps-{key}.so"
    try:
        if not target.is_file():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("could not build the fused NC sweeps (%s): using torch operations", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in _SUFFIX.values():
        getattr(lib, f"sweep1_{suffix}").argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
        getattr(lib, f"sweep2_{suffix}").argtypes = [ptr, ptr, i64, i64, i64, i64] + [ptr] * 11
        getattr(lib, f"relu_moments_{suffix}").argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
    return lib


def loops(device: torch.device | str) -> str:
    """What measures on `device`: "compiled" (this module's loops) or "torch" (its operations);
    each trial's run carries it as a tag (schema.TAG_MEASURE_LOOPS)."""
    return "compiled" if torch.device(device).type == "cpu" and library() is not None else "torch"


def usable(H: torch.Tensor) -> bool:
    """Whether the fused sweeps take these features: a contiguous float32/float64 CPU matrix,
    and the library built."""
    return (H.device.type == "cpu" and H.dtype in _SUFFIX and H.ndim == 2 and H.is_contiguous()
            and library() is not None)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def sweep1(H: torch.Tensor, y: torch.Tensor, C: int, h0: torch.Tensor, S: torch.Tensor,
           inv_sum: torch.Tensor, sq_sum: torch.Tensor) -> None:
    """Add H (N, D) with class indices y (N,) to S (2C, D), inv_sum (C,) and sq_sum (), all
    float64 and contiguous: S[c] += sum (h_i - h0), S[C + c] += sum (h_i - h0)/||h_i||,
    inv_sum[c] += sum 1/||h_i||, sq_sum += sum ||h_i||^2 (i in class c)."""
    N, D = H.shape
    y = y.contiguous()
    h0 = h0.to(H.dtype).contiguous()
    getattr(library(), f"sweep1_{_SUFFIX[H.dtype]}")(
        _ptr(H), _ptr(y), N, D, C, _ptr(h0), _ptr(S), _ptr(inv_sum), _ptr(sq_sum))


def sweep2(H: torch.Tensor, y: torch.Tensor, mu_G: torch.Tensor, mu_c: torch.Tensor, QT: torch.Tensor,
           MQ: torch.Tensor, MM: torch.Tensor, half: torch.Tensor, U: torch.Tensor, var: torch.Tensor,
           SW: torch.Tensor) -> torch.Tensor:
    """Add H (N, D) with class indices y (N,) to U (C, D), var (C,) and SW (r, r) (float64,
    contiguous): with x_i = h_i - mu_G, r_i = h_i - mu_c[y_i] and p_i = QT r_i, U[c] += sum
    x_i/||x_i||, var[c] += sum ||r_i||^2, SW += sum p_i p_i^T. Returns the (N,) nearest
    class centres, argmax_c <p_i, MQ[c]> + MM[y_i, c] - half[c]. mu_G (D,), mu_c (C, D) and
    QT (r, D) in H's dtype; MQ (C, r), MM (C, C), half (C,) float64; all contiguous."""
    N, D = H.shape
    C, R = mu_c.shape[0], QT.shape[0]
    y = y.contiguous()
    ncc = torch.empty(N, dtype=torch.int64)
    scratch = torch.empty(D, dtype=H.dtype)
    getattr(library(), f"sweep2_{_SUFFIX[H.dtype]}")(
        _ptr(H), _ptr(y), N, D, C, R, _ptr(mu_G), _ptr(mu_c), _ptr(QT), _ptr(MQ), _ptr(MM), _ptr(half),
        _ptr(U), _ptr(var), _ptr(SW), _ptr(ncc), _ptr(scratch))
    return ncc


def relu_moments(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X (N, D) through ReLU in place, and its columns' mean and biased variance (D,) in
    float64: a train-mode BN's statistics of the ReLU's output, in the same pass as the ReLU."""
    N, D = X.shape
    mean, var = torch.empty(D, dtype=torch.float64), torch.empty(D, dtype=torch.float64)
    scratch = torch.empty(3, D, dtype=X.dtype)
    getattr(library(), f"relu_moments_{_SUFFIX[X.dtype]}")(
        _ptr(X), N, D, _ptr(mean), _ptr(var), _ptr(scratch[0]), _ptr(scratch[1]), _ptr(scratch[2]))
    return mean, var
