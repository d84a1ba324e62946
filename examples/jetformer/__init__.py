"""JetFormer (arXiv 2411.19722) on jetblocks: Jet + a Gemma-style decoder + a GMM head.

Modules: ``model`` (the network), ``sampling`` (KV-cache sampling with guidance, captioning),
``task`` (the loss for ``jetblocks.train.Trainer``), ``data`` (captioned shapes, digit
captions), ``presets``, ``run`` (building and loading runs). ``python -m examples.jetformer
--help`` lists the commands; measuring a run is ``benchmarks/jetformer_measure.py``.
"""
