"""Distributed meta-training on Ray: the same objective as ``stamp_dist.meta.trainer``, at cluster scale.

- ``sampler``: Ray actors that own slices of the reference classes and serve uint8 images; the
  worker-side stream that assembles (and prefetches) this rank's episodes from them.
- ``learner``: a DeepSpeed engine over the meta-model and one meta-step on a rank's share of a
  meta-batch (the same meta-gradient as the single-process step on the whole meta-batch).
- ``aggregator``: the named actor that turns rank 0's weights into versioned generator artifacts.
- ``worker``: the Ray Train per-worker loop (checkpoints, resume, validation, tracking, stop requests).
- ``launch``: start or join Ray, create the actors, run ``TorchTrainer``; what `stamp meta-train` calls
  with ``runtime.backend=ray``.
"""
