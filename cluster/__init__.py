"""kilnlm.cluster: distributed pretraining on Ray Train (see docs/training.md and DESIGN.md).

``config`` (JobConfig, ClusterConfig), ``parallelize`` (FSDP2 from outside the model), ``worker``
(the per-rank loop), ``checkpointing`` (sharded DCP checkpoints, checksums, export), ``hooks``
(the checkpoint registration hook), ``metrics`` (MFU, history, CSV/PNG/TensorBoard),
``launcher`` (TorchTrainer and the driver's view), ``sweep`` (``kiln sweep``). Import the
submodule you need: only ``launcher`` imports Ray at import time.
"""
