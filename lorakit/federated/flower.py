"""Flower's public modules, imported on first use with an error naming the extra that installs them."""

from __future__ import annotations

from lorakit.privacy import require

app = require("flwr.app", "federated")
clientapp = require("flwr.clientapp", "federated")
serverapp = require("flwr.serverapp", "federated")
