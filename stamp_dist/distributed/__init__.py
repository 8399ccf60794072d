"""The Ray backend of the one meta-training loop (``stamp_dist.meta.trainer``): the parts it plugs in.

- ``engine``: a DeepSpeed engine over the meta-learned modules and the ``torch.distributed`` group
  (the loop's ``Engine`` and ``Group``; the same meta-gradient as the local backend on the same global
  meta-batch, and the same checkpoint format).
- ``sampler``: Ray actors that own slices of the reference classes and serve uint8 images (the pools
  of the loop's ``EpisodeStream``).
- ``aggregator``: the named actor that turns rank 0's weights into versioned generator artifacts.
- ``worker``: the Ray Train per-worker function (checkpoints through Ray Train, publishing through the
  aggregator, stop requests through a file).
- ``launch``: start or join Ray, create the actors, run ``TorchTrainer``; what `stamp meta-train` calls
  with ``runtime.backend=ray``.
- ``rendezvous``: the workers' process group on loopback for a run on one machine.
"""
