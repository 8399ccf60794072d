"""`stamp bench`: every pruning method side by side, at the same budget, data and fine-tuning, on
held-out targets: the cells are planned and cached (``plan``), run (``run``: each gives a typed
``record.CellRecord``) and turned into the report (``report``: rows and the noise rule in ``stats``,
markdown in ``tables``, PNGs in ``plots``).

A *cell* = (target, data regime, seed, method, budget):

* **Data.** The regime's *sample* is ``train_per_class`` images per class drawn (seeded) from the
  target's train split (0 = the whole split); the *scoring set* is every other image of the target
  (rest of train + test), at most ``bench.eval_per_class`` per class (seeded; 0 = all). The
  one-shot pruners — STAMP's set encoder, SNIP / GraSP / Taylor — read the same *pruning batch*:
  ``prune.samples_per_class`` random images per class of the sample; the new head of every pruned
  model is initialised from that batch's class prototypes. Methods that train before pruning
  (``train_prune``, ``learn_gates``, ``train_stamp``) and every fine-tune use the whole sample.
* **Methods** (the registry ``methods.METHODS``): ``dense`` (no pruning: the fine-tuned reference);
  ``random`` / ``l1`` / ``snip`` / ``grasp`` / ``synflow`` / ``taylor`` / ``magnitude``
  (``pruning/baselines.py``; scored on the reference backbone, with a prototype head for the
  target where the score needs the target's loss); ``train_prune`` (fine-tune dense on the sample,
  prune that model by L1, fine-tune again with the same schedule); ``learn_gates``
  (``pruning/gates.py``); ``stamp`` (the meta-trained generator reads the pruning batch);
  ``train_stamp`` (``train_prune`` with STAMP's channels instead of L1's). All start
  from the same reference-pretrained backbone (``pretrain.out``), meet the budget through the same
  surgery path and are fine-tuned with the same schedule (``finetune.*``, the regime's epoch count)
  and seed.
* **Measured** per cell: top-1 on the scoring set before and after fine-tuning, params, MACs,
  latency at batch 1 and 64 (``measure.latency_report``; once per distinct architecture per run),
  and wall time per stage: ``masks`` (scoring / encoding / gate training), ``surgery`` (channel
  removal + head), ``dense_finetune`` (train_prune's and train_stamp's first fine-tune), ``finetune`` (the final one).
  Time to the pruned model = every stage but the final fine-tune; total = all of them. STAMP's
  meta-training is a one-off cost shared by every target and is not in any cell.

Each finished cell is one JSON file under ``bench.out/<target>/tpc<N>/`` holding its *key*: the
settings its result depends on (schedule, backbone fingerprint, and the method's ``cache_key``: the
generator hash for ``stamp`` and ``train_stamp``, gate settings for ``learn_gates``). A re-run skips cells whose stored key
matches and re-runs the rest, so changing the fine-tune epochs or retraining the generator redoes
exactly the cells it affects.
"""

from .report import write_report
from .run import BenchRun, run_bench

__all__ = ["BenchRun", "run_bench", "write_report"]
