"""Training KV predictors (and auxiliary models): data, losses, ridge initialisation, the loop.

:func:`run_kvp_training` is what ``kvp-mlx train`` runs, configured by a :class:`KVPRunConfig`.
"""

from kvp_mlx.training.kvp_run import KVPRunConfig, run_kvp_training
from kvp_mlx.training.loop import TrainConfig, train
from kvp_mlx.training.losses import LossWeights

__all__ = ["KVPRunConfig", "LossWeights", "TrainConfig", "run_kvp_training", "train"]
