"""Adapters for frameworks users already have.

- :mod:`memkernels.integrations.torch`: every kernel as a PyTorch custom op (``torch.ops.memkernels.*``)
  with fake-tensor implementations, so ``torch.compile(fullgraph=True)`` traces models calling them.
- :mod:`memkernels.integrations.transformers`: ``register()`` adds a ``"memkernels"`` attention
  implementation (and its mask function) to transformers.

Each is imported on demand; neither framework is a dependency of memkernels itself.
"""
