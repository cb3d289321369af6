"""Tables, plots, reading and docs results page of ``experiments/main_job.py``'s record.

Everything here reads the JSON record only (``main_job.py --render-only`` redraws it), so
the docs section is a function of numbers that a rerun reproduces.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from experiments.report import machine_words, markdown, mean_std, plain, write_section

WITHIN = 1.0  # points below the seed's dense accuracy that still count
LABELS = {
    "magnitude": "magnitude |w|",
    "two_stage": "two stages (|w|, then F)",
    "saliency": "OBD saliency F w²/2",
    "saliency_ecsq": "OBD saliency, ECSQ-Fisher",
    "saliency_ecsq_plain": "OBD saliency, ECSQ",
    "saliency_ecsq_retrain": "OBD saliency, ECSQ, retrained",
    "saliency_ecsq_qat": "OBD saliency, ECSQ, quantization-aware training",
    "saliency_step": "OBD saliency, Fisher steps",
    "obs": "block OBS",
    "obs_ecsq_plain": "block OBS, ECSQ",
    "deep_compression": "Deep Compression recipe",
    "choi_uniform": "Choi et al. uniform + entropy coding",
}
BASELINES = ("deep_compression", "choi_uniform")


def best_within(seed_run: dict, method: str) -> dict | None:
    """The quantized point of largest ratio within ``WITHIN`` points of that seed's dense."""
    floor = seed_run["dense"]["accuracy"] - WITHIN
    ok = [p for p in seed_run["methods"][method]["quantized"] if p["accuracy"] >= floor]
    return max(ok, key=lambda p: p["ratio"]) if ok else None


def frontier(points: list[dict]) -> list[tuple]:
    """The accuracy-vs-file-size frontier of one seed and method: the measured ``(bytes,
    accuracy)`` files that no smaller (or equal) file matches in accuracy; ascending in
    both."""
    out: list[tuple] = []
    for size, acc in sorted((p["bytes"], p["accuracy"]) for p in points):
        if out and acc <= out[-1][1]:
            continue
        if out and size == out[-1][0]:
            out.pop()
        out.append((size, acc))
    return out


def size_at(front: list[tuple], accuracy: float) -> tuple[float | None, str]:
    """The file size where the frontier reaches ``accuracy``, linear in log file size
    between the two measured points around it: ``(bytes, "crossed")``; or ``(None,
    "below")`` when no file is that accurate, ``(None, "above")`` when even the smallest
    file measured is (the crossing lies beyond the grid: never extrapolated)."""
    if front and front[0][1] >= accuracy:
        return None, "above"
    for (b1, a1), (b2, a2) in itertools.pairwise(front):
        if a1 < accuracy <= a2:
            t = (accuracy - a1) / (a2 - a1)
            return float(np.exp(np.log(b1) + t * (np.log(b2) - np.log(b1)))), "crossed"
    return None, "below"


def accuracy_at(front: list[tuple], size: float) -> float | None:
    """The frontier's accuracy at ``size`` bytes (linear in log size between measured
    points), ``None`` outside the sizes measured."""
    for (b1, a1), (b2, a2) in itertools.pairwise(front):
        if b1 <= size <= b2:
            t = (np.log(size) - np.log(b1)) / (np.log(b2) - np.log(b1))
            return float(a1 + t * (a2 - a1))
    return None


def robust(seed_run: dict, method: str) -> dict:
    """The ratio at exactly ``WITHIN`` points below the seed's dense accuracy, read off the
    seed's frontier; ``ratio`` is ``None`` when the frontier does not cross there."""
    dense = seed_run["dense"]
    n = dense["n_params"]
    front = frontier(seed_run["methods"][method]["quantized"])
    size, status = size_at(front, dense["accuracy"] - WITHIN)
    return {
        "ratio": None if size is None else 4.0 * n / size,
        "bytes": size,
        "status": status,
        "front": front,
    }


def paired(seeds: list[dict], method: str, other: str) -> dict:
    """``method`` against ``other`` at equal file size, seed by seed: at the size where
    ``method``'s frontier is ``WITHIN`` below dense, the accuracy of ``other``'s frontier
    there (``method`` minus ``other``, points; ``None`` where either is not measured), and
    the ratio of their ratios at that accuracy."""
    diffs, ratios = [], []
    for run in seeds:
        a, b = robust(run, method), robust(run, other)
        acc = accuracy_at(b["front"], a["bytes"]) if a["bytes"] is not None else None
        target = run["dense"]["accuracy"] - WITHIN
        diffs.append(None if acc is None else target - acc)
        both = a["ratio"] is not None and b["ratio"] is not None
        ratios.append(a["ratio"] / b["ratio"] if both else None)
    return {"accuracy_diffs": diffs, "ratio_ratios": ratios}


def _ms(values, fmt="{:.1f}") -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return (fmt + " ± " + fmt).format(m, s)


def summarize(model_rec: dict) -> dict:
    seeds = model_rec["seeds"]
    methods = list(seeds[0]["methods"])
    out = {"dense": [r["dense"]["accuracy"] for r in seeds], "methods": {}}
    for m in methods:
        best = [best_within(r, m) for r in seeds]
        found = [b for b in best if b is not None]
        levels = [lv["level"] for lv in seeds[0]["methods"][m]["levels"]]
        acc = {
            f"{lvl:g}": [r["methods"][m]["levels"][i]["accuracy"] for r in seeds]
            for i, lvl in enumerate(levels)
        }
        sparsity = {
            f"{lvl:g}": [r["methods"][m]["levels"][i]["sparsity"] for r in seeds]
            for i, lvl in enumerate(levels)
        }
        out["methods"][m] = {
            "pruning": seeds[0]["methods"][m].get("pruning", m),
            "robust": [{k: v for k, v in robust(r, m).items() if k != "front"} for r in seeds],
            "ratios": [b["ratio"] if b else None for b in best],
            "best": best,
            "n_found": len(found),
            "pruned_accuracy": acc,
            "sparsity": sparsity,
        }
    out["paired"] = {
        b: {m: paired(seeds, m, b) for m in methods if m not in BASELINES}
        for b in BASELINES
        if b in methods
    }
    return out


def _seed_value(entry: dict) -> str:
    if entry["ratio"] is not None:
        return f"{entry['ratio']:.1f}"
    return "not reached" if entry["status"] == "below" else "beyond the grid"


def robust_table(s: dict) -> list[list[str]]:
    """Per method: the ratio at exactly ``WITHIN`` points below dense, per seed."""
    rows = [["method", f"ratio at dense − {WITHIN:g} pt (interpolated)", "per seed"]]
    for m, v in s["methods"].items():
        found = [e["ratio"] for e in v["robust"] if e["ratio"] is not None]
        rows.append(
            [
                LABELS.get(m, m),
                (_ms(found) + "x" if found else "—") + f" ({len(found)}/{len(v['robust'])})",
                ", ".join(_seed_value(e) for e in v["robust"]),
            ]
        )
    return rows


def paired_cell(p: dict) -> str:
    """One method against one baseline at equal file size: the mean accuracy difference,
    how many seeds are ahead, whether the mean is beyond the seed spread, per seed."""
    diffs = [d for d in p["accuracy_diffs"] if d is not None]
    if not diffs:
        return "—"
    mean = float(np.mean(diffs))
    if len(diffs) > 1:
        spread = float(np.std(diffs, ddof=1))
        verdict = "beyond" if abs(mean) > spread else "within"
        verdict += f" the seed spread ({spread:.2f})"
    else:
        verdict = "one seed"
    per_seed = ", ".join("—" if d is None else f"{d:+.2f}" for d in p["accuracy_diffs"])
    return f"{mean:+.2f}; ahead {sum(d > 0 for d in diffs)}/{len(diffs)}; {verdict}; {per_seed}"


def paired_table(s: dict) -> list[list[str]]:
    """Each method against each baseline at equal file size (points of accuracy), at the
    size where the method's frontier is ``WITHIN`` below dense; "—" where either frontier
    does not cover that size."""
    bases = list(s.get("paired", {}))
    rows = [["method", *[f"against {LABELS.get(b, b)}" for b in bases]]]
    for m in s["methods"]:
        if m in bases:
            continue
        rows.append([LABELS.get(m, m), *[paired_cell(s["paired"][b][m]) for b in bases]])
    return rows


def ratio_table(s: dict) -> list[list[str]]:
    rows = [
        [
            "method",
            f"ratio within {WITHIN:g} pt",
            "seeds",
            "its accuracy (%)",
            "its sparsity",
            "its bits",
            "file (B)",
        ]
    ]
    for m, v in s["methods"].items():
        found = [b for b in v["best"] if b]
        rows.append(
            [
                LABELS.get(m, m),
                _ms([b["ratio"] for b in found]) + ("x" if found else ""),
                f"{v['n_found']}/{len(v['best'])}",
                _ms([b["accuracy"] for b in found], "{:.2f}"),
                _ms([100 * b["sparsity"] for b in found]) + ("%" if found else ""),
                ", ".join(sorted({b["bits"] for b in found})) or "—",
                _ms([b["bytes"] for b in found], "{:.0f}"),
            ]
        )
    return rows


def split_table(s: dict) -> list[list[str]]:
    """Per method, what the bytes of its file within ``WITHIN`` point pay for (mean over
    the seeds that have one), and the bits per parameter of the whole model."""
    parts = ("positions", "codes", "codebooks", "raw")
    rows = [["method", "file (B)", "bits/param", *parts, "kept weights"]]
    for m, v in s["methods"].items():
        found = [b for b in v["best"] if b and "split" in b]
        if not found:
            continue
        rows.append(
            [
                LABELS.get(m, m),
                f"{np.mean([b['bytes'] for b in found]):,.0f}",
                f"{np.mean([b['bits_per_param'] for b in found]):.3f}",
                *[f"{np.mean([b['split'][k] for b in found]):,.0f}" for k in parts],
                f"{np.mean([b['split']['kept'] for b in found]):,.0f}",
            ]
        )
    return rows


def pruning_rows(s: dict) -> list[str]:
    """The first method of each pruning run: one per run, not per quantizer."""
    first: dict[str, str] = {}
    for m, v in s["methods"].items():
        first.setdefault(v["pruning"], m)
    return list(first.values())


def level_table(s: dict) -> list[list[str]]:
    """Pruned accuracy per level, one column per pruning run (not per quantizer)."""
    methods = pruning_rows(s)
    levels = list(s["methods"][methods[0]]["pruned_accuracy"])
    rows = [["target sparsity", *[LABELS.get(m, m) for m in methods]]]
    for lvl in levels:
        rows.append(
            [
                f"{float(lvl):.0%}",
                *[_ms(s["methods"][m]["pruned_accuracy"][lvl], "{:.2f}") for m in methods],
            ]
        )
    return rows


def reading(name: str, s: dict) -> list[str]:
    """Plain sentences from the numbers: who wins, by how much against seed noise."""
    lines = []
    dense_m, dense_s = mean_std(s["dense"])
    lines.append(f"Dense {name}: {dense_m:.2f} ± {dense_s:.2f}% test accuracy.")
    means = {}
    for m, v in s["methods"].items():
        r = [x for x in v["ratios"] if x is not None]
        if len(r) == len(v["ratios"]):
            means[m] = mean_std(r)
    ours = [m for m in means if m not in BASELINES]
    if means:
        top = max(means, key=lambda m: means[m][0])
        lines.append(
            f"Largest ratio within {WITHIN:g} point: {LABELS.get(top, top)}, "
            f"{means[top][0]:.1f} ± {means[top][1]:.1f}x."
        )
    if ours:
        best = max(ours, key=lambda m: means[m][0])
        for b in BASELINES:
            if b not in means:
                continue
            base = means[b]
            gap = means[best][0] - base[0]
            noise = means[best][1] + base[1]
            # Paired by seed: both methods start from the same dense model and data order.
            diffs = [
                x - y
                for x, y in zip(
                    s["methods"][best]["ratios"], s["methods"][b]["ratios"], strict=True
                )
            ]
            ahead = sum(d > 0 for d in diffs)
            lines.append(
                f"{LABELS.get(best, best)} (the largest of the library's methods) against "
                f"{LABELS[b]} in the same run ({base[0]:.1f} ± {base[1]:.1f}x): {gap:+.1f}x, "
                + ("beyond" if abs(gap) > noise else "within")
                + " seed noise (sum of stds "
                f"{noise:.1f}); seed by seed (the same dense model for both): ahead on "
                f"{ahead} of {len(diffs)} (" + ", ".join(f"{d:+.1f}x" for d in diffs) + ")."
            )
    for m in s["methods"]:
        if m not in means:
            lines.append(
                f"{LABELS.get(m, m)}: no quantized point within {WITHIN:g} point on "
                f"{len(s['methods'][m]['ratios']) - s['methods'][m]['n_found']} seed(s)."
            )
    # The paper's claim: the two stages lose less accuracy than magnitude at equal sparsity.
    mag = s["methods"].get("magnitude")
    for m in ("two_stage", "saliency", "obs"):
        other = s["methods"].get(m)
        if not mag or not other:
            continue
        diffs = {
            lvl: np.mean(other["pruned_accuracy"][lvl]) - np.mean(mag["pruned_accuracy"][lvl])
            for lvl in mag["pruned_accuracy"]
        }
        noise = {
            lvl: np.std(mag["pruned_accuracy"][lvl], ddof=1) if len(s["dense"]) > 1 else 0.0
            for lvl in diffs
        }
        text = ", ".join(f"{float(lvl):.0%}: {d:+.2f}" for lvl, d in diffs.items())
        wins = [lvl for lvl, d in diffs.items() if d > 2 * noise[lvl]]
        loses = [lvl for lvl, d in diffs.items() if d < -2 * noise[lvl]]
        verdict = (
            "ahead beyond 2 stds at " + ", ".join(f"{float(x):.0%}" for x in wins)
            if wins
            else "never ahead beyond 2 stds of magnitude's seed spread"
        )
        if loses:
            verdict += "; behind beyond 2 stds at " + ", ".join(f"{float(x):.0%}" for x in loses)
        if len(s["dense"]) < 2:
            verdict = "one seed: no noise estimate"
        lines.append(
            f"{LABELS[m]} vs magnitude, pruned accuracy (points) at each level: {text}; {verdict}."
        )
    return lines


def plot(name: str, model_rec: dict, s: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = np.mean(s["dense"])
    paths = [out / f"{name}_sparsity.png", out / f"{name}_pareto.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, v in s["methods"].items():
        if m not in pruning_rows(s):
            continue  # the same pruning run as another row
        xs = [100 * np.mean(v["sparsity"][lvl]) for lvl in v["pruned_accuracy"]]
        ys = [np.mean(a) for a in v["pruned_accuracy"].values()]
        es = [np.std(a, ddof=1) if len(a) > 1 else 0 for a in v["pruned_accuracy"].values()]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=LABELS.get(m, m))
    ax.axhline(dense, color="k", ls=":", lw=1, label="dense")
    ax.axhline(dense - WITHIN, color="gray", ls="--", lw=1, label=f"dense - {WITHIN:g}")
    ax.set_xlabel("sparsity of the kernels (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{name}: pruned while training (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = model_rec["seeds"][0]["dense"]["n_params"]
    for i, m in enumerate(s["methods"]):
        pts = [p for r in model_rec["seeds"] for p in r["methods"][m]["quantized"]]
        ax.scatter(
            [p["bytes"] / 1024 for p in pts],
            [p["accuracy"] for p in pts],
            s=14,
            color=f"C{i}",
            label=LABELS.get(m, m),
        )
    ax.scatter([4 * n / 1024], [dense], marker="*", s=120, color="k", label="dense float32")
    ax.axhline(dense - WITHIN, color="gray", ls="--", lw=1, label=f"dense - {WITHIN:g}")
    ax.set_xscale("log")
    ax.set_xlabel("saved file (KiB, log scale)")
    ax.set_ylabel("test accuracy of the loaded file (%)")
    ax.set_title(f"{name}: accuracy against file size (every seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def render(record: dict, out: Path, *, plots: bool = True) -> dict:
    """Tables and reading per model (printed and as markdown), and the plots."""
    text, sections = [], {}
    for name, model_rec in record["models"].items():
        s = summarize(model_rec)
        lines = reading(name, s)
        pngs = plot(name, model_rec, s, out) if plots else []
        text += [
            f"\n{name} ({model_rec['describe']}), {len(model_rec['seeds'])} seed(s), "
            f"{model_rec['seconds']:.0f} s",
            plain(ratio_table(s)),
            "",
            plain(robust_table(s)),
            plain(paired_table(s)),
            "",
            plain(split_table(s)),
            "",
            plain(level_table(s)),
            *["- " + line for line in lines],
        ]
        sections[name] = {
            "summary": s,
            "lines": lines,
            "pngs": [str(p) for p in pngs],
            "ratio_table": markdown(ratio_table(s)),
            "robust_table": markdown(robust_table(s)),
            "paired_table": markdown(paired_table(s)),
            "paired": bool(s["paired"]),
            "level_table": markdown(level_table(s)),
            "split_table": markdown(split_table(s)),
        }
    return {"text": "\n".join(text), "sections": sections}


def _minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.0f} minutes" if m >= 10 else f"{m:.1f} minutes"


def command_of(record: dict, folder: str = "results") -> str:
    """The command that computes ``record`` into the results folder ``folder``: the make target
    where it ran every model and method of it, else ``main_job`` with the models and methods
    it ran (and ``--out`` where ``folder`` is a folder of the repository other than the
    default)."""
    dataset = record["dataset"]
    target = "make demo" if dataset == "digits" else "make reproduce-fashion"
    default = ["digits-cnn"] if dataset == "digits" else ["lenet5", "lenet-300-100"]
    names = list(record["models"])
    methods = list(next(iter(record["models"].values()))["seeds"][0]["methods"])
    full = (
        names == default
        and methods == list(LABELS)
        and not record.get("quick")
        and folder == "results"
    )
    if full and dataset in ("digits", "fashion-mnist"):
        return target
    args = [f"--dataset {dataset}", f"--models {','.join(names)}"]
    if methods != list(LABELS):
        args.append(f"--methods {','.join(methods)}")
    if record.get("jobs", 1) > 1:
        args.append(f"--jobs {record['jobs']}")
    if record.get("quick"):
        args.append("--quick")
    if folder != "results" and not Path(folder).is_absolute():
        args.append(f"--out {folder}")
    return "python -m experiments.main_job " + " ".join(args)


def write_docs(page: Path, record: dict, summary: dict, folder: str = "results") -> None:
    """Replace the section of ``page`` with the report of ``record`` (its JSON in ``folder``)."""
    dataset = record["dataset"]
    command = command_of(record, folder)
    when = f"{record['date_utc']}, " if "date_utc" in record else ""
    out = [
        f"Generated by `{command}`"
        + ("" if command.startswith("python") else " (`python -m experiments.main_job`)")
        + f" on {when}"
        f"{record['platform']}, {machine_words(record)}; its phases took "
        f"{_minutes(record['seconds'])} in all (the sum of each phase's time when it was "
        "computed, compilation included); the command that wrote the JSON ran "
        f"{_minutes(record['wall_seconds'])} of wall time ({record.get('jobs', 1)} worker "
        f"process{'es' if record.get('jobs', 1) > 1 else ''}; phases it read from the cache "
        "take no time there); every number is in "
        f"`{folder}/{dataset}-main.json`"
        + (
            f"; code version `{record['code_version']}` "
            "(`python -c 'from experiments.versions import code_version; print(code_version())'`"
            " prints a checkout's)."
            if "code_version" in record
            else "."
        )
    ]
    for name, sec in summary["sections"].items():
        cfg = record["models"][name]["config"]
        out += [
            "",
            f"**{name}** ({record['models'][name]['describe']}; "
            f"{record['models'][name]['seeds'][0]['dense']['n_params']:,} parameters). "
            f"Dense: {cfg['dense_steps']} Adam steps; pruning: {cfg['ramp']} ramp + "
            f"{cfg['hold']} hold steps per level, codebook fine-tuning {cfg['ft_steps']} "
            "steps, the same for every method. Ratio = float32 dense bytes / bytes of the "
            "saved file; accuracy of the model loaded from the file.",
            "",
            sec["ratio_table"],
            "",
            f"The same, read off each seed's accuracy-vs-file-size frontier (the measured "
            "files that no smaller file matches in accuracy) where it is exactly "
            f"{WITHIN:g} point below dense, linear in log file size between the two "
            'measured files around it, never extrapolated ("not reached": no file within '
            'the point; "beyond the grid": even the smallest file is):',
            "",
            sec["robust_table"],
            "",
            *(
                [
                    "Accuracy at equal file size (points; the method minus the baseline, at "
                    f"the size where the method's frontier is {WITHIN:g} point below dense, "
                    "on the baseline's frontier there): mean; seeds ahead; the mean against "
                    "the seed spread; per seed:",
                    "",
                    sec["paired_table"],
                    "",
                ]
                if sec["paired"]
                else []
            ),
            "What each method's file within the point holds (bytes, mean over the seeds "
            "that have one): positions of the kept weights, their codes, the codebooks, and "
            "the leaves stored raw (the biases with --raw-biases; by default they are coded "
            "like the kernels); bits per parameter of the whole model:",
            "",
            sec["split_table"],
            "",
            "Accuracy after pruning while training (before quantization), mean ± std over seeds:",
            "",
            sec["level_table"],
            "",
            *[f"- {line}" for line in sec["lines"]],
        ]
        if sec["pngs"]:
            out += ["", "Plots: " + ", ".join(f"`{p}`" for p in sec["pngs"]) + "."]
    write_section(page, f"main:{dataset}", "\n".join(out))
