"""A no-op Flower app: Flower's own floor per round on the Deployment Engine (``benchmarks/flower_overhead.py``).

Per round the ServerApp sends every node a ``train`` message, then an ``evaluate`` message, each carrying a
17 KB array (a FedAvg-DeepFM upload's size), and the ClientApp echoes it back. The ServerApp waits for replies
exactly as fedmarket's does (pull, 0.05 s sleep) and writes the seconds of each round to run config ``out``.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


def _exchange(grid: Grid, kind: str, nodes: list[int]) -> None:
    payload = np.zeros(4352, dtype=np.float32)
    messages = [
        Message(content=RecordDict({"arrays": ArrayRecord([payload])}), dst_node_id=n, message_type=kind)
        for n in nodes
    ]
    pending = set(grid.push_messages(messages))
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
        if pending:
            time.sleep(0.05)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes: list[int] = []
    while len(nodes) < int(cfg["nodes"]):
        nodes = sorted(grid.get_node_ids())
        time.sleep(0.2)
    _exchange(grid, "train", nodes)  # warm-up: the first messages pay for start-up, as fedmarket's discovery
    seconds = []
    for _ in range(int(cfg["rounds"])):
        t0 = time.perf_counter()
        _exchange(grid, "train", nodes)
        _exchange(grid, "evaluate", nodes)
        seconds.append(time.perf_counter() - t0)
    with open(str(cfg["out"]), "w") as f:
        json.dump(seconds, f)
