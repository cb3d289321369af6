"""The report of experiments/reproduce.py: statistics, tables, the generated reading, plots, docs.

Everything here reads the run's record (the JSON that ``reproduce.py`` writes) and its
configuration; nothing trains or compresses, which is what ``reproduce.py --render-only``
relies on. ``cfg`` is the experiment's ``Config`` (its fields ``methods``, ``settings``,
``quant_methods``, ``sparsities``, ``bits``, ... name what was swept).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from experiments.reproduce import Config

DEEP_COMPRESSION_LENET5 = 39.0  # Han, Mao, Dally 2016, Table 1: LeNet-5 on MNIST, 0.74% error


# ---------------------------------------------------------------------------------------------
# Statistics, tables, reading


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def cpu_cores() -> int:
    """The cores this process may use (taskset, containers), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_meta(start: float, started: str) -> dict[str, Any]:
    """What a results page says of the run that measured it, taken at the run's end.

    ``start`` is the run's ``time.perf_counter()`` at its start, ``started`` its UTC start
    time. The load average tells a reader whether the timings shared the cores.
    """
    return {
        "wall_minutes": (time.perf_counter() - start) / 60,
        "started_utc": started,
        "machine": f"{platform.machine()}, {cpu_cores()} CPU cores",
        "load_average": os.getloadavg()[2] if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def machine_words(meta: dict[str, Any]) -> str:
    """``meta["machine"]`` and, when recorded, the load average of the run's last 15 minutes."""
    load = meta.get("load_average")
    machine = meta.get("machine", "the machine")
    if load is None:
        return machine
    return f"{machine}, load average {load:.1f} over the run's last 15 minutes"


def summarize(cfg: Config, runs: list[dict]) -> dict:
    """Means, stds and paired differences against magnitude, per setting and sparsity."""
    s: dict[str, Any] = {"dense_acc": mean_std([r["dense_acc"] for r in runs])}
    s["pruning"] = {}
    for setting in cfg.settings:
        s["pruning"][setting] = {}
        for ft in ("no_ft", "ft"):
            tab = {}
            for sp in cfg.sparsities:
                k = f"{sp:g}"
                mag = np.array([r["pruning"][setting]["magnitude"][ft][k] for r in runs])
                row = {}
                for meth in cfg.methods:
                    a = np.array([r["pruning"][setting][meth][ft][k] for r in runs])
                    d = a - mag
                    row[meth] = {
                        "mean": float(a.mean()),
                        "std": mean_std(a)[1],
                        "diff_vs_magnitude": float(d.mean()),
                        "diff_std": mean_std(d)[1],
                    }
                tab[k] = row
            s["pruning"][setting][ft] = tab
    s["quantization"] = {}
    for qm in cfg.quant_methods:
        s["quantization"][qm] = {}
        for b in cfg.bits:
            cells = [r["quantization"][qm][str(b)] for r in runs]
            acc = mean_std([c["acc"] for c in cells])
            size = mean_std([c["bytes"] for c in cells])
            ratio = mean_std([c["ratio"] for c in cells])
            s["quantization"][qm][str(b)] = {
                "avg_bits": float(np.mean([c["avg_bits"] for c in cells])),
                "acc": acc[0],
                "acc_std": acc[1],
                "bytes": size[0],
                "ratio": ratio[0],
                "ratio_std": ratio[1],
            }
    s["quant_base_acc"] = mean_std([r["quant_base_acc"] for r in runs])
    return s


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (bytes, acc, label) that no other point beats in both size and accuracy."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _compare(tab: dict, meth: str, n_seeds: int) -> tuple[list, list, list]:
    """Sparsities where ``meth`` beats, loses to, or ties with magnitude, beyond noise.

    Noise: twice the std over seeds of the paired difference (one network per seed, pruned
    both ways), or half a point with a single seed.
    """
    wins, losses, ties = [], [], []
    for k, row in tab.items():
        d, sd = row[meth]["diff_vs_magnitude"], row[meth]["diff_std"]
        tag = f"{float(k) * 100:g}% ({100 * d:+.1f} ± {100 * sd:.1f})"
        noise = 2 * sd if n_seeds > 1 else 0.005
        (wins if d > noise else losses if d < -noise else ties).append(tag)
    return wins, losses, ties


def _setting_label(cfg: Config, setting: str, ft: str) -> str:
    where = "FC layers" if setting == "fc" else "all layers"
    when = "no fine-tuning" if ft == "no_ft" else f"{cfg.finetune_steps} fine-tuning steps"
    return f"{where}, {when}"


def reading(cfg: Config, s: dict, n_seeds: int) -> list[str]:
    """The honest reading, generated from the numbers."""
    lines = []
    dense, dense_sd = s["dense_acc"]
    lines.append(
        f"Dense accuracy {pct(dense)} ± {pct(dense_sd)} % over {n_seeds} seed"
        f"{'s' if n_seeds > 1 else ''}. Differences to magnitude pruning are paired (the same "
        "trained network per seed, pruned both ways), in points, as mean ± std over seeds; "
        "a difference counts only when it exceeds twice that std"
        + (" (with one seed: half a point)." if n_seeds == 1 else ".")
    )
    # The paper's claim: two-stage beats magnitude at equal sparsity on the FC layers.
    claim = []
    for ft in ("no_ft", "ft"):
        w, lo, t = _compare(s["pruning"]["fc"][ft], "two_stage", n_seeds)
        when = "without fine-tuning" if ft == "no_ft" else "after fine-tuning"
        claim.append(f"{when}, better at {len(w)}, worse at {len(lo)}, within noise at {len(t)}")
    lines.append(
        "**The paper's claim** (magnitude then Fisher beats magnitude alone at the same "
        f"sparsity of the FC layers), over {len(cfg.sparsities)} sparsities: "
        + "; ".join(claim)
        + "."
    )
    for setting in cfg.settings:
        for ft in ("no_ft", "ft"):
            tab = s["pruning"][setting][ft]
            parts = []
            for meth in [m for m in ("two_stage", "fisher", "saliency") if m in cfg.methods]:
                wins, losses, ties = _compare(tab, meth, n_seeds)
                bits = []
                if wins:
                    bits.append("better at " + ", ".join(wins))
                if losses:
                    bits.append("worse at " + ", ".join(losses))
                if ties:
                    bits.append("within noise at " + ", ".join(ties))
                parts.append(f"**{meth}** " + "; ".join(bits))
            spread = [100 * row["magnitude"]["std"] for row in tab.values()]
            lines.append(
                f"*{_setting_label(cfg, setting, ft)}*, against magnitude: "
                + ". ".join(parts)
                + f". (Magnitude's own spread over seeds: {min(spread):.1f} to "
                f"{max(spread):.1f} points.)"
            )
    # The highest sparsity each criterion reaches within one point of the dense accuracy.
    for setting in cfg.settings:
        best = []
        for meth in cfg.methods:
            ok = [
                float(k)
                for k, row in s["pruning"][setting]["ft"].items()
                if row[meth]["mean"] >= dense - 0.01
            ]
            best.append(f"{meth} {max(ok):.0%}" if ok else f"{meth} none")
        lines.append(
            f"Highest sparsity within 1 point of dense ({_setting_label(cfg, setting, 'ft')}): "
            + ", ".join(best)
            + "."
        )
    # Best compression within one point of the dense accuracy.
    points = []
    for qm in cfg.quant_methods:
        for b, c in s["quantization"][qm].items():
            points.append((c["ratio"], c["acc"], qm, b, c["bytes"]))
    ok = [p for p in points if p[1] >= dense - 0.01]
    where = "all layers" if cfg.quant_setting == "all" else "FC layers"
    if ok:
        r, a, qm, b, size = max(ok, key=lambda p: p[0])
        lines.append(
            f"Best compression within 1 point of the dense accuracy: **{r:.1f}x** "
            f"({size / 1024:.1f} KiB, accuracy {pct(a)} %) with {qm} at {b} average bits on "
            f"the {cfg.quant_method} model pruned to {cfg.quant_sparsity:.0%} ({where}) and "
            f"fine-tuned. Deep Compression reports {DEEP_COMPRESSION_LENET5:.0f}x for LeNet-5 "
            "on MNIST (Han et al. 2016). Not comparable one to one: another dataset "
            f"({cfg.dataset}), "
            + (
                "the same network"
                if cfg.model == "lenet5"
                else "a smaller network (fewer redundant weights: Deep Compression's LeNet-5 "
                "has 431k parameters, 93% of them in one FC layer)"
            )
            + f", one {cfg.scope} sparsity instead of a tuned per-layer schedule, short "
            "fine-tuning, and this file counts every byte (header, codebooks, positions)."
        )
    else:
        lines.append(
            "No quantized model stays within 1 point of the dense accuracy (the pruned model "
            f"before quantization: {pct(s['quant_base_acc'][0])} %)."
        )
    qwin = []
    for b in cfg.bits:
        accs = {qm: s["quantization"][qm][str(b)]["acc"] for qm in cfg.quant_methods}
        order = sorted(accs, key=accs.get, reverse=True)
        fb = s["quantization"].get("fisher_bits", {}).get(str(b), {}).get("avg_bits")
        note = f"; fisher_bits used {fb:.2f} bits" if fb is not None else ""
        qwin.append(
            f"{b} bits: {order[0]} {pct(accs[order[0]])} % > {order[1]} "
            f"{pct(accs[order[1]])} %{note}"
        )
    lines.append("Most accurate quantizers per average bit budget: " + "; ".join(qwin) + ".")
    both = {"fisher_bits", "kmeans"} <= set(cfg.quant_methods)
    bigger = [
        f"{b} bits ({s['quantization']['fisher_bits'][str(b)]['ratio']:.1f}x vs "
        f"{s['quantization']['kmeans'][str(b)]['ratio']:.1f}x)"
        for b in cfg.bits
        if both
        and s["quantization"]["fisher_bits"][str(b)]["ratio"]
        < 0.98 * s["quantization"]["kmeans"][str(b)]["ratio"]
    ]
    if bigger:
        lines.append(
            "Mixed widths cost file space: at " + ", ".join(bigger) + " fisher_bits' file is "
            "larger than one-width k-means' although its mean bits are not higher, because it "
            "also stores which width each weight has and one codebook per width."
        )
    return lines


def pruning_table(cfg: Config, s: dict, setting: str, ft: str) -> list[list[str]]:
    rows = [["sparsity", *cfg.methods]]
    for sp in cfg.sparsities:
        k = f"{sp:g}"
        row = s["pruning"][setting][ft][k]
        best = max(row[m]["mean"] for m in cfg.methods)
        cells = []
        for m in cfg.methods:
            c = f"{pct(row[m]['mean'])} ± {pct(row[m]['std'])}"
            cells.append(f"**{c}**" if row[m]["mean"] == best else c)
        rows.append([f"{sp:.0%}", *cells])
    return rows


def quant_table(cfg: Config, s: dict) -> list[list[str]]:
    rows = [["avg bits", *[f"{qm} acc / ratio" for qm in cfg.quant_methods]]]
    for b in cfg.bits:
        cells = []
        for qm in cfg.quant_methods:
            c = s["quantization"][qm][str(b)]
            cell = f"{pct(c['acc'])} ± {pct(c['acc_std'])} / {c['ratio']:.1f}x"
            if qm == "fisher_bits":
                cell += f" ({c['avg_bits']:.2f} b)"
            cells.append(cell)
        rows.append([str(b), *cells])
    return rows


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell (``magnitude |w|``) is escaped."""
    cells = [[c.replace("|", "\\|") for c in r] for r in rows]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(out)


def plain(rows: list[list[str]]) -> str:
    strip = [[c.replace("**", "") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in strip) for i in range(len(strip[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in strip)


# ---------------------------------------------------------------------------------------------
# Plots


def plot_sparsity(cfg: Config, s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey=True)
    xs = np.array(cfg.sparsities) * 100
    for i, setting in enumerate(cfg.settings):
        for j, ft in enumerate(("no_ft", "ft")):
            ax = axes[i, j]
            for meth in cfg.methods:
                rows = [s["pruning"][setting][ft][f"{sp:g}"][meth] for sp in cfg.sparsities]
                mu = np.array([r["mean"] for r in rows]) * 100
                sd = np.array([r["std"] for r in rows]) * 100
                ax.errorbar(xs, mu, yerr=sd, marker="o", ms=3, capsize=2, label=meth)
            ax.axhline(s["dense_acc"][0] * 100, color="k", ls=":", lw=1, label="dense")
            ax.set_title(
                f"{'FC layers' if setting == 'fc' else 'all layers'} pruned, "
                + ("no fine-tuning" if ft == "no_ft" else f"{cfg.finetune_steps} fine-tune steps")
            )
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("sparsity of the pruned kernels (%)")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{cfg.dataset}: accuracy vs sparsity (mean ± std over {len(cfg.seeds)} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(cfg: Config, s: dict, dense_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = []
    for qm in cfg.quant_methods:
        cs = [s["quantization"][qm][str(b)] for b in cfg.bits]
        kb = np.array([c["bytes"] for c in cs]) / 1024
        acc = np.array([c["acc"] for c in cs]) * 100
        ax.errorbar(
            kb,
            acc,
            yerr=np.array([c["acc_std"] for c in cs]) * 100,
            marker="o",
            ms=4,
            capsize=2,
            label=qm,
        )
        for b, x, y in zip(cfg.bits, kb, acc, strict=True):
            ax.annotate(str(b), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            points.append((x, y, qm))
    front = pareto(points)
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    dense = s["dense_acc"][0] * 100
    ax.scatter([dense_bytes / 1024], [dense], marker="*", s=120, color="k", label="dense float32")
    ax.axhline(dense - 1, color="gray", ls=":", lw=1, label="dense - 1 point")
    ax.set_xscale("log")
    plain_number = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain_number)
    ax.xaxis.set_minor_formatter(plain_number)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compressed file size (KiB, log scale; labels: average bits)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{cfg.dataset}: {cfg.quant_method} pruned to {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting} layers), fine-tuned, then quantized"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Docs results page


def docs_section(
    cfg: Config, s: dict, lines: list[str], command: str, record: dict, meta: dict
) -> str:
    wall, cached = record["wall_time_s"], record.get("cached_prune_time_s", 0.0)
    auto = cfg.quant_sparsity_auto
    when = f"{meta['started_utc']}, " if "started_utc" in meta else ""
    if cached:
        timing = (
            f"measured time {(wall + cached) / 60:.1f} min in all: {cached / 60:.1f} min of "
            f"pruning phases stored in `--cache-dir` when they ran, {wall / 60:.1f} min for the "
            "final invocation"
        )
    else:
        timing = f"wall time {wall / 60:.1f} min"
    if "cpu_time_s" in record:
        timing += f" (CPU time of the process {record['cpu_time_s'] / 60:.1f} min)"
    out = [
        f"Command: `{command}` — {timing} ({when}{machine_words(meta)}; "
        f"jax {meta['jax']} on {meta['backend']}), {len(cfg.seeds)} seeds, jit compilation "
        "included.",
        "",
        f"Model `{cfg.model}`: {meta['model_description']} ({meta['n_params']:,} parameters, "
        f"{meta['n_prunable']['fc']:,} in FC kernels). Adam lr {cfg.lr}, batch "
        f"{cfg.batch_size}, {cfg.train_steps} steps; Fisher = bias-corrected Adam `nu` × batch "
        f"size. Pruning is one-shot and {cfg.scope}; fine-tuning: {cfg.finetune_steps} Adam "
        f"steps at lr {cfg.finetune_lr} with `keep_pruned`. two_stage prunes "
        f"{cfg.magnitude_fraction:.0%} of the target by magnitude, the rest by Fisher. "
        "Quantizers, per layer and at the same average bits per kept weight: uniform "
        "(evenly spaced grid), kmeans (weight sharing, kmeans_1d init "
        f"{cfg.kmeans_init or 'dp'}), fisher_kmeans (the same, weighted by the Fisher), "
        "fisher_bits (the paper: `allocate_bits` gives more bits to weights of higher "
        f"Fisher, widths {list(cfg.bit_widths) or [8, 6, 4, 2]}, then Fisher-weighted k-means).",
        "",
    ]
    for setting in cfg.settings:
        for ft in ("no_ft", "ft"):
            what = "the FC kernels" if setting == "fc" else "all kernels"
            when = "no fine-tuning" if ft == "no_ft" else "fine-tuned"
            title = f"Accuracy (%) after pruning {what}, {when}"
            out += [
                f"**{title}** (mean ± std; best in bold)",
                "",
                markdown(pruning_table(cfg, s, setting, ft)),
                "",
            ]
    out += [
        f"**Quantization** of the fine-tuned {cfg.quant_method} model at {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting} layers"
        + (
            "; chosen as the highest sparsity within 1 point of dense, else the lowest"
            if auto
            else ""
        )
        + f"; float accuracy {pct(s['quant_base_acc'][0])} %): "
        "accuracy (%) / compression vs float32 dense, from the size of the file "
        "`save_compressed` writes.",
        "",
        markdown(quant_table(cfg, s)),
        "",
        "**Reading** (generated from the numbers above):",
        "",
        *[f"- {line}" for line in lines],
        "",
        f"Plots: `{meta['plots'][0]}`, `{meta['plots'][1]}`; every number: `{meta['json']}`.",
    ]
    return "\n".join(out)


def write_section(page: Path, key: str, text: str) -> bool:
    """Replace the text between ``<!-- results:KEY:begin -->`` and its end marker in ``page``.

    Returns False, and leaves the page as it is, when the page or one pair of markers is
    missing.
    """
    begin, end = f"<!-- results:{key}:begin -->", f"<!-- results:{key}:end -->"
    if not page.is_file():
        print(f"Page {page} not found: results section not written.")
        return False
    src = page.read_text()
    if src.count(begin) != 1 or src.count(end) != 1 or src.index(begin) > src.index(end):
        print(f"Page {page} lacks one pair of {begin} / {end}: section not written.")
        return False
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    page.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", src))
    print(f"Wrote the results section between {begin} and {end} in {page}.")
    return True


# ---------------------------------------------------------------------------------------------
# Everything at once


def render(
    cfg: Config,
    record: dict,
    out_dir: Path,
    *,
    plots: bool = True,
    page: Path | None = None,
    command: str = "",
) -> dict:
    """Print the tables and the reading, draw the plots, write the JSON and the docs section.

    Args:
      cfg: the run's configuration.
      record: what ``reproduce.compute`` returned (or the JSON it wrote, read back).
      out_dir: where ``<dataset>.json`` and the PNGs go.
      plots: draw ``<dataset>_sparsity.png`` and ``<dataset>_pareto.png``.
      page: a docs page whose section between the markers ``results:oneshot:<dataset>`` is
        replaced.
      command: the command that reproduces the run, quoted in the docs section.

    Returns:
      The record with its ``summary`` and ``reading``, as written to the JSON.
    """
    runs, meta = record["runs"], dict(record["meta"])
    s = summarize(cfg, runs)
    lines = reading(cfg, s, len(runs))
    stem = cfg.dataset
    json_path = out_dir / f"{stem}.json"
    png1, png2 = out_dir / f"{stem}_sparsity.png", out_dir / f"{stem}_pareto.png"
    meta["plots"] = [str(png1), str(png2)]
    meta["json"] = str(json_path)
    for setting in cfg.settings:
        for ft in ("no_ft", "ft"):
            when = "no fine-tuning" if ft == "no_ft" else "fine-tuned"
            print(f"\naccuracy (%) — {setting} kernels pruned, {when}:")
            print(plain(pruning_table(cfg, s, setting, ft)))
    print(
        f"\nquantization of {cfg.quant_method} at {cfg.quant_sparsity:.0%} "
        f"({cfg.quant_setting}): accuracy (%) / compression ratio"
    )
    print(plain(quant_table(cfg, s)))
    print()
    for line in lines:
        print("- " + line.replace("**", "").replace("*", ""))
    print(
        f"\nwall time {record['wall_time_s']:.0f} s, CPU time {record.get('cpu_time_s', 0):.0f} s"
    )
    if plots:
        plot_sparsity(cfg, s, png1)
        plot_pareto(cfg, s, 4 * meta["n_params"], png2)
    record = {**record, "meta": meta, "summary": s, "reading": lines}
    json_path.write_text(json.dumps(record, indent=1))
    print(f"wrote {json_path}" + (f", {png1}, {png2}" if plots else ""))
    if page is not None:
        text = docs_section(cfg, s, lines, command, record, meta)
        write_section(page, f"oneshot:{cfg.dataset}", text)
    return record
