"""Run a federated job locally on Flower's simulation engine (Ray): ``clients`` virtual SuperNodes, each
holding one partition, played by ``num_cpus`` worker processes; the ServerApp runs in this process."""

from __future__ import annotations

import logging

from lorakit.common.errors import SettingError
from lorakit.federated.client import make_client_app
from lorakit.federated.config import FedConfig
from lorakit.federated.server import FedResult, check_run, make_server_app
from lorakit.privacy import require


def simulate(cfg: FedConfig, num_cpus: int = 2) -> FedResult:
    """Run all rounds of ``cfg`` in Flower's simulation engine; returns the server's :class:`FedResult`.
    The output directory, the data and the clients' settings are checked before the engine starts
    (:func:`~lorakit.federated.server.check_run`), so a mistake there costs no simulation."""
    if num_cpus < 1:
        raise SettingError(f"--num-cpus {num_cpus}: the simulation needs at least 1 worker process")
    checked = check_run(cfg)
    simulation = require("flwr.simulation", "federated")
    require("ray", "federated")
    results: list[FedResult | Exception] = []
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "logging_level": logging.ERROR},
    }
    simulation.run_simulation(
        server_app=make_server_app(cfg, results, checked),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.clients,
        backend_config=backend,
    )
    if not results:
        raise RuntimeError("the federated run failed; see the Flower log above for the ServerApp's error")
    if isinstance(results[0], Exception):
        raise results[0]
    return results[0]
