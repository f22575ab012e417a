"""The bench report: one JSON, Markdown tables and plots from the finished sections."""

from __future__ import annotations

from pathlib import Path


def _f(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def tables(sections: dict) -> str:
    """Markdown: one table per benchmark, every estimator a row."""
    out = ["# layerif bench", ""]
    for suite, sec in sections.items():
        res, st = sec["result"], sec["settings"]
        out += [f"## {suite}", "", "settings: " + ", ".join(f"{k}={v}" for k, v in st.items()), ""]
        if suite == "lds-digits":
            out += ["| estimator | curvature | unit | LDS | seconds |", "|---|---|---|---|---|"]
            out += [f"| {r['estimator']} | {r['curvature']} | {r['unit']} | {_f(r['lds'])} | "
                    f"{r['seconds']} |" for r in res["rows"]]
        elif suite == "mislabel-digits":
            i = res["fractions"].index(0.2)
            out += ["| estimator | curvature | unit | AUC self | AUC validation | "
                    "found@20% self / validation | seconds |", "|---|---|---|---|---|---|---|"]
            out += [f"| {r['estimator']} | {r['curvature']} | {r['unit']} | "
                    f"{_f(r['self_influence_auc'])} | {_f(r['validation_auc'])} | "
                    f"{_f(r['self_influence_found'] and r['self_influence_found'][i], '.2f')} / "
                    f"{_f(r['validation_found'][i], '.2f')} | {r['seconds']} |"
                    for r in res["rows"]]
        elif suite == "estimators-lm":
            out += ["| estimator | own seconds | x DataInf | own peak MiB | IHVP error vs "
                    "exact, max / median (cosine, median) | layer Spearman vs exact / DataInf / "
                    "EK-FAC | error |", "|---|---|---|---|---|---|---|"]
            for r in res["rows"]:
                if "error" in r:
                    out.append(f"| {r['estimator']} | - | - | - | - | - | {r['error']} |")
                    continue
                sp = " / ".join(_f(r.get(f"layer_spearman_vs_{k}"))
                                for k in ("exact", "datainf", "ekfac"))
                ih = r.get("ihvp_error_vs_exact")
                ih = (f"{ih['max']:.2e} / {ih['median']:.2e} ({ih['cosine_median']:.3f})"
                      if ih else "-")
                out.append(f"| {r['estimator']} | {r['seconds_own']} | "
                           f"{_f(r.get('time_ratio_to_datainf'), '.2f')} | "
                           f"{_f(r.get('peak_mib_own'), '.1f')} | {ih} | {sp} | |")
        elif suite == "lds-lm":
            out += [f"fine-tune: {res['steps_full']} steps on {res['n_train']} examples, "
                    f"validation loss {res['val_loss_full']:.3f} (the halves: "
                    f"{res['val_loss_halves']:.3f} on average); {res['subsets']} retrains in "
                    f"{res['retrain_seconds']} s", "",
                    "| estimator | LDS | own seconds | error |", "|---|---|---|---|"]
            out += [f"| {r['estimator']} | - | - | {r['error']} |" if "error" in r else
                    f"| {r['estimator']} | {_f(r['lds'])} | {r['seconds_own']} | |"
                    for r in res["rows"]]
        elif suite == "class-detection":
            out += ["| estimator | AUC | recall@k | own seconds | error |",
                    "|---|---|---|---|---|"]
            out += [f"| {r['estimator']} | - | - | - | {r['error']} |" if "error" in r else
                    f"| {r['estimator']} | {_f(r['auc'])} | {_f(r['recall_at_k'])} | "
                    f"{r['seconds_own']} | |" for r in res["rows"]]
        out.append("")
    return "\n".join(out)


def plots(sections: dict, folder: Path) -> list[str]:
    """PNG figures of the finished sections; the names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    def bars(rows, key, label, name, title):
        rows = [r for r in rows if r.get(key) is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
        names = [r.get("config", r["estimator"]) for r in rows]
        ax.barh(names, [r[key] for r in rows], color="#4477aa")
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_title(title)
        save(fig, name)

    if "lds-digits" in sections:
        bars(sections["lds-digits"]["result"]["rows"], "lds", "LDS", "lds_digits.png",
             "Linear datamodeling score (digits)")
    if "mislabel-digits" in sections:
        res = sections["mislabel-digits"]["result"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, key, title in zip(axes, ("self_influence_found", "validation_found"),
                                  ("by self-influence", "by validation influence")):
            for r in res["rows"]:
                if r[key] is not None:
                    ax.plot([0] + res["fractions"], [0] + r[key], marker="o", label=r["config"])
            ax.plot([0, 1], [0, 1], ":", color="grey")
            ax.set_xlabel("fraction of the training set inspected")
            ax.set_title(f"flipped labels found, {title}")
        axes[0].set_ylabel("fraction of the flipped labels found")
        axes[1].legend(fontsize=7)
        save(fig, "mislabel_digits.png")
    if "lds-lm" in sections:
        bars(sections["lds-lm"]["result"]["rows"], "lds", "LDS", "lds_lm.png",
             "Linear datamodeling score (LoRA fine-tune of the LM)")
    if "class-detection" in sections:
        bars(sections["class-detection"]["result"]["rows"], "auc", "mean AUC",
             "class_detection.png", "Task detection on a mixture")
    if "estimators-lm" in sections:
        rows = [r for r in sections["estimators-lm"]["result"]["rows"] if "error" not in r]
        ref = next((k for k in ("exact", "ekfac", "datainf")
                    if any(f"layer_spearman_vs_{k}" in r for r in rows)), None)
        if ref is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            for r in rows:
                x, y = max(r["seconds_own"], 1e-3), r[f"layer_spearman_vs_{ref}"]
                ax.scatter(x, y)
                ax.annotate(r["estimator"], (x, y), fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("own seconds (preconditioning + scores)")
            ax.set_ylabel(f"layer-score Spearman vs {ref}")
            ax.set_title("Cost against agreement (same gradients)")
            save(fig, "cost_vs_agreement.png")
    return written


__all__ = ["tables", "plots"]
