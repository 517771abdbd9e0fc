"""The Flower app for deployment (``flwr run``): both apps read their settings from the run config.

Named in ``lorakit/federated/flwr_app/pyproject.toml`` as ``lorakit.federated.app:server_app`` and
``lorakit.federated.app:client_app``; see docs/federated.md.
"""

from __future__ import annotations

from lorakit.federated.client import make_client_app
from lorakit.federated.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
