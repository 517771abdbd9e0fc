"""Flower's Message API in one process for the federated tests: the real ClientApp and ServerApp over a
Grid that delivers each message by calling the ClientApp (no Ray, no sockets)."""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from lorakit.federated import FedConfig
from lorakit.federated.client import make_client_app
from lorakit.federated.server import make_server_app


class LocalGrid(Grid):
    """Delivers each message to the real ClientApp in this process, one Context per virtual SuperNode.

    ``node_ids[i]`` is the id of the node holding partition ``partitions[i]`` (default: 101 + i holds i); like
    Flower's simulation, which draws random node ids, ``shuffle`` (a ``random.Random``) returns each batch of
    replies in a random order. ``tamper(reply, sent)`` may change or replace each reply."""

    def __init__(self, client_app, num_nodes: int, tamper=None, node_ids=None, partitions=None, shuffle=None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp process
        self.app, self.tamper, self.shuffle, self.sent, self.replies = client_app, tamper, shuffle, [], []
        node_ids = node_ids or [101 + i for i in range(num_nodes)]
        partitions = partitions or list(range(num_nodes))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": part, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, part in zip(node_ids, partitions, strict=True)
        }

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("LocalGrid only answers send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("LocalGrid only answers send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # as Flower does: the failure comes back as an error reply
                reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
            replies.append(self.tamper(reply, msg) if self.tamper else reply)
        self.replies += replies
        if self.shuffle is not None:
            self.shuffle.shuffle(replies)
        return replies


def run_local(cfg: FedConfig, tamper=None, **grid_options):
    """The ServerApp and ClientApp of ``cfg`` over a :class:`LocalGrid`; the result and the grid."""
    results: list = []
    grid = LocalGrid(make_client_app(cfg), cfg.clients, tamper, **grid_options)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(cfg, results)(grid, context)
    assert len(results) == 1 and not isinstance(results[0], Exception), results
    return results[0], grid


def failed_run(cfg: FedConfig, **grid_options):
    """Run ``cfg`` as :func:`run_local` where it must fail; the exception and the grid."""
    results: list = []
    grid = LocalGrid(make_client_app(cfg), cfg.clients, **grid_options)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Exception) as raised:
        make_server_app(cfg, results)(grid, context)
    assert results == [raised.value]
    return raised.value, grid


def use_local_engine(monkeypatch) -> list:
    """``lorakit federate`` with a LocalGrid in place of Flower's Ray engine (the rest of ``simulate`` runs as
    it is); the list receives each run's grid."""
    import flwr.simulation

    grids: list = []

    def run_simulation(server_app, client_app, num_supernodes, backend_config):
        grids.append(LocalGrid(client_app, num_supernodes))
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        server_app(grids[-1], context)  # as Flower does, the ServerApp's exception ends the simulation

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    return grids
