"""The Flower app objects (``[tool.flwr.app.components]`` in pyproject.toml):
``serverapp = "fedmarket.flower.app:server_app"``, ``clientapp = "fedmarket.flower.app:client_app"``."""

from __future__ import annotations

from fedmarket.environment import apply_quiet_env  # noqa: E402

apply_quiet_env()

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedmarket.flower.client import handle, skip_dynamo_import  # noqa: E402
from fedmarket.flower.secagg import secaggplus_when_asked  # noqa: E402

client_app = ClientApp()
server_app = ServerApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    skip_dynamo_import()  # see its docstring: torch's compiler is not needed here
    return handle(msg, context)


@client_app.train(mods=[secaggplus_when_asked])  # SecAgg+ rounds (fedmarket.flower.secagg); others pass
def train(msg: Message, context: Context) -> Message:
    skip_dynamo_import()  # see its docstring: torch's compiler is not needed here
    return handle(msg, context)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    skip_dynamo_import()  # see its docstring: torch's compiler is not needed here
    return handle(msg, context)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmarket.flower.server import serve  # not imported by ClientApp processes (one per message)

    serve(grid, dict(context.run_config))
