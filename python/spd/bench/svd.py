"""bench/svd: exact, gram and randomized top-r right singular subspaces of an M x d row matrix.

The rows (float32, like captured gradients) are G = Q diag(s) V^T with V a random orthogonal d x d
matrix and Q [M, d] stacked from random orthogonal d x d blocks (the last block cut), so the float64
reference needs no big SVD: G^T G = V S (Q^T Q) S V^T with Q^T Q known exactly from the blocks; its
d x d eigendecomposition in float64 gives the exact right singular vectors. The spectrum decays
geometrically from 1 to 0.1 over the top r values, then drops 10x and decays on to 1e-4, so the
top-r subspace is well defined and the angle measures numerical error only. Methods: ``exact``
(spd.linalg.svd_exact, float64 LAPACK/cuSOLVER), ``gram`` (G^T G accumulated in float64 with
spd_ext.capture_gram_, then eigh; timed together), ``randomized`` (spd.linalg.svd_randomized: spd_ext
rsvd, cuSOLVER gesvdr on CUDA), peers ``torch.svd_lowrank`` and on CUDA ``cupy.linalg.svd``. Error:
the largest principal angle between the top-r subspaces of the method and of the reference. Peak
memory: above the start of the call (CPU: VmHWM reset in process; CUDA: max_memory_allocated).
Sizes whose estimated footprint exceeds 80% of the available memory are skipped with the reason.
"""
from __future__ import annotations

import math

import torch

from . import common

FULL = dict(Ms=[10_000, 100_000, 1_000_000], ds=[128, 512, 1024, 4096], max_reps=5)
QUICK = dict(Ms=[10_000], ds=[128, 512], max_reps=3)
TINY = dict(Ms=[600], ds=[16, 32], max_reps=2)
TARGET = {"M": 1_000_000, "d": 1024, "speedup": 10.0, "angle_rad": 1e-3}
N_BLOCKS = 4  # distinct orthogonal blocks of Q, cycled


def ranks_for(d: int) -> list[int]:
    """r = d/2 and r = 64 (d/4 at the tiny test sizes, where 64 is not below d/2)."""
    return sorted({d // 2, 64 if 64 <= d // 2 else max(1, d // 4)}, reverse=True)


def spectrum(d: int, r: int) -> torch.Tensor:
    j = torch.arange(d, dtype=torch.float64)
    top = 10 ** (-j[:r] / max(r, 1))
    rest = 10 ** (-2 - 2 * (j[r:] - r) / max(d - r, 1))
    return torch.cat([top, rest])


def make_problem(M: int, d: int, r: int, device, seed: int = 0):
    """(rows float32 [M, d] on device, reference basis float64 [d, r] on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    s = spectrum(d, r)
    blocks = [torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] for _ in range(N_BLOCKS)]
    scale = 1 / math.sqrt(max(M / d, 1))
    right = s[:, None] * V.T * scale  # diag(s) V^T
    rows = torch.empty(M, d, dtype=torch.float32, device=device)
    QtQ = torch.zeros(d, d, dtype=torch.float64)
    for i, start in enumerate(range(0, M, d)):
        part = blocks[i % N_BLOCKS][: min(d, M - start)]
        rows[start:start + part.shape[0]] = (part @ right).float().to(device)
        QtQ += part.T @ part
    # G^T G = V S QtQ S V^T * scale^2: the reference from a d x d eigendecomposition in float64
    inner = s[:, None] * QtQ * s[None, :]
    evals, evecs = torch.linalg.eigh((inner + inner.T) / 2)
    ref = V @ evecs[:, torch.argsort(evals, descending=True)[:r]]
    return rows, ref


def max_angle(ref: torch.Tensor, basis: torch.Tensor) -> float:
    b = basis.detach().to("cpu", torch.float64)
    b = torch.linalg.qr(b)[0]  # guard against slightly non-orthonormal output
    resid = b - ref @ (ref.T @ b)
    return float(torch.arcsin(torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0)))


def _estimate_bytes(method: str, M: int, d: int, r: int) -> int:
    k = min(r + 16, d)
    return {"exact": 8 * M * d * 2 + 8 * d * d * 2,  # float64 copy + U [M, d]
            "gram": 8 * d * d * 3,
            "randomized": 8 * M * d + 8 * M * k * 3,  # float64 copy (CPU) + range sketches
            "svd_lowrank": 4 * M * k * 4 + 4 * M * d,
            "cupy": 4 * M * d * 3}[method]


def _method_fn(method: str, rows: torch.Tensor, r: int):
    from .. import linalg

    if method == "exact":
        return lambda: linalg.svd_exact(rows)[0][:, :r]
    if method == "gram":
        import spd_ext

        def gram():
            g = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            mask = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
            spd_ext.capture_gram_(g, rows, mask)
            return linalg.svd_gram(g)[0][:, :r]
        return gram
    if method == "randomized":
        return lambda: linalg.svd_randomized(rows, r)[0][:, :r]
    if method == "svd_lowrank":
        return lambda: torch.svd_lowrank(rows, q=min(r + 16, rows.shape[1]), niter=4)[2][:, :r]
    if method == "cupy":
        import cupy

        def cp_svd():
            _, _, vh = cupy.linalg.svd(cupy.asarray(rows), full_matrices=False)
            return torch.as_tensor(vh[:r].T.get())
        return cp_svd
    raise AssertionError(method)


def methods_for(device) -> list[str]:
    out = ["exact", "gram", "randomized", "svd_lowrank"]
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401

            out.append("cupy")
        except ImportError:
            pass
    return out


def measure(method, rows, r, ref, device, max_reps=5, budget_s=1.0):
    _method_fn(method, rows[: min(rows.shape[0], 2 * rows.shape[1])], min(r, rows.shape[1]))()  # warm-up
    fn = _method_fn(method, rows, r)
    times, peak, basis = [], None, None
    while len(times) < max_reps and sum(times) < budget_s:
        with common.PeakMemory(device) as mem, common.Timer(device) as t:
            basis = fn()
        times.append(t.seconds)
        peak = mem.peak_bytes if peak is None else max(peak, mem.peak_bytes)
    st = common.summary(times)
    return {"time_s": st, "time_s_median": st["median"], "peak_bytes": peak, "peak_mib": peak / 2**20,
            "peak_method": mem.method, "angle_rad": max_angle(ref, basis)}


def run(*, quick=False, tiny=False, device=None, Ms=None, ds=None, methods=None, log=print) -> dict:
    device = common.resolve_device(device)
    cfg = dict(TINY if tiny else QUICK if quick else FULL)
    if Ms:
        cfg["Ms"] = list(Ms)
    if ds:
        cfg["ds"] = list(ds)
    cfg["methods"] = list(methods) if methods else methods_for(device)
    cfg["device"] = str(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        avail = free
    else:
        avail = common.available_bytes()
    rows_out, skipped = [], []
    for M in cfg["Ms"]:
        for d in cfg["ds"]:
            for r in ranks_for(d):
                base = 4 * M * d
                if base * 1.2 > 0.8 * avail:
                    skipped.append({"what": f"M={M} d={d} r={r} (all methods)",
                                    "reason": f"the float32 rows alone need {base / 2**30:.1f} GiB of "
                                              f"{avail / 2**30:.1f} GiB available"})
                    log(f"skip M={M} d={d} r={r}: rows do not fit")
                    continue
                rows, ref = make_problem(M, d, r, device)
                results = {}
                for method in cfg["methods"]:
                    need = _estimate_bytes(method, M, d, r) + base
                    if need > 0.8 * avail:
                        reason = (f"estimated footprint {need / 2**30:.1f} GiB > 80% of the "
                                  f"{avail / 2**30:.1f} GiB available")
                        skipped.append({"what": f"{method} M={M} d={d} r={r}", "reason": reason})
                        log(f"skip {method} M={M} d={d} r={r}: {reason}")
                        continue
                    try:
                        res = measure(method, rows, r, ref, device, max_reps=cfg["max_reps"])
                    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory
                        skipped.append({"what": f"{method} M={M} d={d} r={r}", "reason": str(exc)[:300]})
                        continue
                    results[method] = res
                    row = {"M": M, "d": d, "r": r, "method": method, **res}
                    rows_out.append(row)
                    log(f"M={M:>8} d={d:>5} r={r:>5} {method:11s} {res['time_s_median']:9.4f} s  "
                        f"peak {res['peak_mib']:9.1f} MiB  angle {res['angle_rad']:.2e} rad")
                if "exact" in results:
                    for row in rows_out[-len(results):]:
                        row["speedup_vs_exact"] = results["exact"]["time_s_median"] / row["time_s_median"]
                del rows
    target = [r for r in rows_out if r["M"] == TARGET["M"] and r["d"] == TARGET["d"]
              and r["method"] in ("gram", "randomized")]
    return {"quick": quick, "tiny": tiny, "config": cfg, "method": __doc__.strip(), "targets": TARGET,
            "available_bytes": avail, "skipped": skipped, "rows": rows_out,
            "target_rows_measured": len(target)}


COLUMNS = [("M", "M", ""), ("d", "d", ""), ("r", "r", ""), ("method", "method", ""),
           ("time s (median)", "time_s_median", ".4g"), ("speedup vs exact", "speedup_vs_exact", ".1f"),
           ("peak MiB", "peak_mib", ".1f"), ("max principal angle rad", "angle_rad", ".1e")]


def extrapolate_exact(rows: list[dict]) -> list[dict]:
    """Rows without a measured ``exact`` at their (d, r) get ``speedup_vs_exact`` against the exact time
    at the largest smaller M, scaled linearly in M (the SVD of a tall M x d matrix is QR-dominated,
    O(M d^2)), and ``exact_extrapolated_from`` = that M. Returns new row dicts."""
    exact = {(r["M"], r["d"], r["r"]): r["time_s_median"] for r in rows if r["method"] == "exact"}
    out = []
    for row in rows:
        row = dict(row)
        if row.get("speedup_vs_exact") is None and (row["M"], row["d"], row["r"]) not in exact:
            smaller = [m for (m, d, r) in exact if d == row["d"] and r == row["r"] and m < row["M"]]
            if smaller:
                m0 = max(smaller)
                t = exact[(m0, row["d"], row["r"])] * row["M"] / m0
                row["speedup_vs_exact"] = t / row["time_s_median"]
                row["exact_extrapolated_from"] = m0
        out.append(row)
    return out


def table(doc) -> str:
    entry = doc["benchmarks"]["svd"]
    rows = extrapolate_exact(entry["rows"])
    for row in rows:
        if row.get("exact_extrapolated_from"):
            row["speedup_vs_exact"] = f"~{row['speedup_vs_exact']:.1f}*"
    note = ""
    if any(r.get("exact_extrapolated_from") for r in rows):
        note = ("\\* exact not run at this size (see skipped): its time extrapolated linearly in M from the "
                "largest measured M at the same d and r (a tall matrix's SVD is QR-dominated, O(M d^2)), a "
                "lower bound where the measured exact time grew faster than M (compare the rows above).")
    doc = {**doc, "benchmarks": {**doc["benchmarks"], "svd": {**entry, "rows": rows}}}
    return common.results_table(doc, "svd", COLUMNS, note=note)


def plot(doc, path) -> None:
    plt = common.pyplot()

    rows = doc["benchmarks"]["svd"]["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        x = [r["M"] * r["d"] for r in mine]
        a1.scatter(x, [r["time_s_median"] for r in mine], label=method, s=14)
        a2.scatter(x, [max(r["angle_rad"], 1e-17) for r in mine], label=method, s=14)
    for ax, ylabel in ((a1, "time (s)"), (a2, "largest principal angle (rad)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("M x d")
        ax.set_ylabel(ylabel)
    a2.axhline(TARGET["angle_rad"], color="gray", lw=0.5)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
