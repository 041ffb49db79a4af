"""Tables of `pissa-fast bench` results: plain text for the terminal, markdown for report.md."""
from __future__ import annotations

import math

from .measure import INF

METHODS = ("pissa_fast", "peft")
ERRORS = ("l1", "rel_recon", "excess")
ERROR_TITLES = {
    "l1": "L1 (mean |A - A*|, |B - B*|, the paper's Table 6 error)",
    "rel_recon": "rel_recon (||BA - W_r||_F / ||W_r||_F)",
    "excess": "excess (||W - BA||_F / ||W - W_r||_F - 1)",
    "sv_rel": "sv_rel (max |S - S*| / S*_1)",
    "l1_rel": "l1_rel (L1 over the mean |A*|, |B*|)",
}


def niter_key(n):
    return math.inf if n == INF else n


def niter_label(n) -> str:
    return "inf" if n == INF else str(n)


def aggregate(measurements: list[dict], method: str, key: str, matrix: str | None = None) -> dict:
    """{(niter, r): value} over the measured matrices: for "time_s" the sum of count x median time (the
    estimated whole-model time; the time itself for one matrix of count 1), for errors the mean
    weighted by count. `matrix` restricts to one matrix (unweighted)."""
    acc: dict = {}
    for m in measurements:
        if m["method"] != method or (matrix is not None and m["matrix"] != matrix):
            continue
        v = m.get(key)
        if v is None:
            continue
        if isinstance(v, str):  # "inf" / "nan" from JSON-cleaned values
            v = float(v)
        if isinstance(v, float) and math.isnan(v):
            continue
        w = 1 if matrix is not None else m["count"]
        s = acc.setdefault((m["niter"], m["r"]), [0.0, 0])
        s[0] += w * v
        s[1] += w
    if key == "time_s":
        return {k: s for k, (s, _) in acc.items()}
    return {k: s / w for k, (s, w) in acc.items() if w}


def ratio(a: dict, b: dict) -> dict:
    out = {}
    for k, va in a.items():
        vb = b.get(k)
        if vb is None:
            continue
        out[k] = va / vb if vb != 0 else (math.nan if va == 0 else math.inf)
    return out


def _time_unit(values) -> tuple[float, str]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and max(finite) >= 1.0:
        return 1.0, "s"
    return 1e3, "ms"


def fmt_time(v, scale=1.0):
    return "-" if v is None else f"{v * scale:.3g}"


def fmt_err(v):
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.2e}"


def fmt_ratio(v):
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def table(title: str, niters, ranks, values: dict, fmt, *, markdown: bool = False, note: str = "") -> str:
    header = ["niter \\ r"] + [str(r) for r in ranks]
    rows = [[niter_label(n)] + [fmt(values.get((n, r))) for r in ranks] for n in niters]
    if markdown:
        out = [f"**{title}**" + (f" {note}" if note else ""), "",
               "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(out) + "\n"
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    out = [title + (f" {note}" if note else ""), line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out) + "\n"


def time_tables(measurements, niters, ranks, *, label: str, markdown=False, matrix=None) -> list[str]:
    pf = aggregate(measurements, "pissa_fast", "time_s", matrix)
    pe = aggregate(measurements, "peft", "time_s", matrix)
    scale, unit = _time_unit(list(pf.values()) + list(pe.values()))
    f = lambda v: fmt_time(v, scale)
    note = "(niter inf: the exact SVD, timed once per matrix at the largest r)" if INF in niters else ""
    return [
        table(f"{label}, pissa_fast, {unit}", niters, ranks, pf, f, markdown=markdown, note=note),
        table(f"{label}, peft path, {unit}", niters, ranks, pe, f, markdown=markdown),
        table(f"{label} ratio pissa_fast / peft (< 1: pissa_fast is faster)", niters, ranks,
              ratio(pf, pe), fmt_ratio, markdown=markdown),
    ]


def error_tables(measurements, niters, ranks, *, markdown=False, matrix=None, errors=ERRORS) -> list[str]:
    out = []
    for key in errors:
        pf = aggregate(measurements, "pissa_fast", key, matrix)
        pe = aggregate(measurements, "peft", key, matrix)
        out.append(table(f"{ERROR_TITLES[key]}, pissa_fast", niters, ranks, pf, fmt_err, markdown=markdown))
        out.append(table(f"{ERROR_TITLES[key]}, peft path", niters, ranks, pe, fmt_err, markdown=markdown))
        if key == "l1":
            out.append(table("L1 ratio pissa_fast / peft (< 1: pissa_fast is more accurate)", niters, ranks,
                             ratio(pf, pe), fmt_ratio, markdown=markdown))
    return out


def headline(measurements, niters, ranks) -> list[str]:
    """Per rank: how fast pissa_fast reaches the accuracy of peft's most accurate finite niter."""
    finite = [n for n in niters if n != INF]
    if not finite:
        return []
    t_pf = aggregate(measurements, "pissa_fast", "time_s")
    t_pe = aggregate(measurements, "peft", "time_s")
    l1_pf = aggregate(measurements, "pissa_fast", "l1")
    l1_pe = aggregate(measurements, "peft", "l1")
    scale, unit = _time_unit(list(t_pf.values()) + list(t_pe.values()))
    lines = []
    for r in ranks:
        n_pe = min(finite, key=lambda n: l1_pe.get((n, r), math.inf))
        target = l1_pe.get((n_pe, r))
        if target is None:
            continue
        ok = [n for n in finite if l1_pf.get((n, r), math.inf) <= target]
        if not ok:
            lines.append(f"r={r}: no pissa_fast niter in the grid reaches peft's best L1 {target:.2e} "
                         f"(peft niter {n_pe})")
            continue
        n_pf = min(ok, key=lambda n: t_pf.get((n, r), math.inf))
        a, b = t_pf[(n_pf, r)], t_pe[(n_pe, r)]
        lines.append(
            f"r={r}: pissa_fast niter {n_pf} ({fmt_time(a, scale)} {unit}, L1 {l1_pf[(n_pf, r)]:.2e}) is at least "
            f"as accurate as the peft path's best, niter {n_pe} ({fmt_time(b, scale)} {unit}, L1 {target:.2e}): "
            + (f"{b / a:.3g}x faster" if b >= a else f"{a / b:.3g}x slower"))
    return lines


def estimate_table(measurements, niters, ranks, *, markdown=False, matrix=None) -> str:
    """pissa_fast's true l1_rel beside its own a-posteriori estimate (Decomposition.estimate)."""
    true = aggregate(measurements, "pissa_fast", "l1_rel", matrix)
    est = aggregate(measurements, "pissa_fast", "estimate", matrix)
    vals = {k: f"{fmt_err(v)} / {fmt_err(est.get(k))}" for k, v in true.items() if k[0] != INF}
    return table("l1_rel of pissa_fast: true / its estimate (the estimate is what tol= bounds)",
                 [n for n in niters if n != INF], ranks, vals, lambda v: "-" if v is None else v, markdown=markdown)


def matched(matched_records, match, ranks) -> dict:
    """{(N, r): the matched-accuracy comparison} over the measured weights: peft's pissa_niter_N against
    pissa_fast.svd_lowrank_equivalent(N, r), times summed (count-weighted) and errors averaged."""
    agg = {(m, k): aggregate(matched_records, m, k) for m in ("peft", "pissa_fast_matched")
           for k in ("time_s", "l1", "l1_rel", "estimate", "niter_used")}
    out = {}
    for N in match:
        for r in ranks:
            key = (N, r)
            if key not in agg[("peft", "time_s")] or key not in agg[("pissa_fast_matched", "time_s")]:
                continue
            t_pe, t_pf = agg[("peft", "time_s")][key], agg[("pissa_fast_matched", "time_s")][key]
            out[key] = dict(t_peft=t_pe, t_pf=t_pf, speedup=t_pe / t_pf if t_pf > 0 else math.inf,
                            l1_peft=agg[("peft", "l1")][key], l1_pf=agg[("pissa_fast_matched", "l1")][key],
                            l1_rel=agg[("pissa_fast_matched", "l1_rel")].get(key),
                            estimate=agg[("pissa_fast_matched", "estimate")].get(key),
                            niter_used=agg[("pissa_fast_matched", "niter_used")].get(key))
    return out


def matched_headline(matched_records, match, ranks) -> list[str]:
    """The headline: matched-accuracy speed-up against peft at each N of --match, per rank."""
    cells = matched(matched_records, match, ranks)
    if not cells:
        return []
    scale, unit = _time_unit([c["t_pf"] for c in cells.values()] + [c["t_peft"] for c in cells.values()])
    lines = []
    for (N, r), c in cells.items():
        ok = c["l1_pf"] <= c["l1_peft"]
        lines.append(
            f"peft pissa_niter_{N}, r={r}: pissa_fast "
            + (f"{c['speedup']:.3g}x faster" if c["speedup"] >= 1 else f"{1 / c['speedup']:.3g}x slower")
            + " at matched accuracy "
            f"({fmt_time(c['t_pf'], scale)} vs {fmt_time(c['t_peft'], scale)} {unit}; L1 {c['l1_pf']:.2e} vs "
            f"{c['l1_peft']:.2e}{'' if ok else ', LESS ACCURATE'}; niter used "
            f"{'exact SVD' if c['niter_used'] is None else format(c['niter_used'], '.3g')}, "
            f"l1_rel {fmt_err(c['l1_rel'])}, estimated {fmt_err(c['estimate'])})")
    return lines


def matched_table(matched_records, match, ranks, *, markdown=False) -> str:
    cells = matched(matched_records, match, ranks)
    vals = {k: f"{c['speedup']:.3g}x" + ("" if c["l1_pf"] <= c["l1_peft"] else " (less accurate)")
            for k, c in cells.items()}
    return table("matched accuracy: speed-up of pissa_fast.svd_lowrank_equivalent(N, r) over peft's "
                 "pissa_niter_N (rows: N)", list(match), ranks, vals, lambda v: "-" if v is None else v,
                 markdown=markdown)
