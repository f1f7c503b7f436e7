"""Offline post-training: supervised fine-tuning, a reward model, DPO.

Each is a plug-in of the one training step (``kilnlm.train.train_step`` takes an ``Objective``)
and the one Ray Train worker (``cluster.worker.WorkerSpec.posttrain``): ``data`` reads the chat and
preference JSONL people already have, ``defaults`` builds the embedded stdlib sets, ``sft``,
``reward`` and ``dpo`` hold each objective's batches, loss and figures, ``plugin`` what they
share, and ``job`` the driver side (prepare, score, export). The model never imports Ray.
See docs/post-training.md.
"""
