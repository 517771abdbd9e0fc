"""Federated fine-tuning on Flower, with client-level differential privacy: DP-DyLoRA and DP-FedAvg.

``config`` (settings), ``partition`` (iid / label-skew splits), ``strategy`` (update space, cohort and rank
sampling, DP-FedAvg aggregation), ``client`` / ``server`` (Flower ClientApp and ServerApp), ``simulate``
(Flower's simulation engine), ``app`` (the apps for ``flwr run``). Flower is imported on first use; install
with ``pip install 'lorakit[federated]'``.
"""

from __future__ import annotations

from lorakit.federated.config import FedConfig
from lorakit.federated.partition import partition

__all__ = ["FedConfig", "partition"]
