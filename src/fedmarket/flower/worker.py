"""A long-lived ClientApp process for a SuperNode, and a SuperNode with a shorter idle poll (Flower 1.41).

By default a SuperNode (``--isolation subprocess``) starts Flower's SuperExec, which starts a fresh
``flwr-clientapp`` process for every message: that process re-imports flwr, torch and fedmarket, installs the
FAB and rebuilds the market's trainer before our handler runs (~6 s a message on a loaded 2-core machine).
Flower 1.41 has no long-lived ClientApp of its own (``flwr-clientapp`` serves one task token and exits;
SuperExec's warm pools are Kubernetes-only and not for ClientApps). This module is one:

    flower-supernode --isolation process --port 9094 ...            # serves tasks, starts no SuperExec
    python -m fedmarket.flower.worker clientapp --runtime-api-address 127.0.0.1:9094 --insecure

``clientapp`` imports the ClientApp once, then acquires the SuperNode's ClientApp tasks itself (the
Runtime API's ``AcquireTask``, as SuperExec does) and runs each one in this process, exactly as
``flwr-clientapp`` would (pull the message, context, run and FAB; run the app; push the reply and the
context; task heartbeats while it runs) but without exiting. The FAB is installed once per hash and the app
module stays imported, so the market's parsed data and built trainer stay in memory between messages
(``fedmarket.flower.client``: reused only when its state is the one the message needs). A task that raises
is answered with an error reply, as by ``flwr-clientapp``, and the process goes on.

``supernode`` runs Flower's own ``flower-supernode`` in this process with its waits shortened: Flower
1.41 hard-codes a 3 s sleep between two polls of the SuperLink that find no message (and 0.5 s between
checks for the ClientApp's reply); ``--poll-interval S`` caps every sleep in that loop at S seconds.
Everything else is Flower's code, unchanged. With ``--clientapp`` it also starts the long-lived ClientApp
above as its child (same process group, so stopping the SuperNode's group stops both; it exits when the
SuperNode does):

    python -m fedmarket.flower.worker supernode --poll-interval 0.2 --clientapp -- \\
        --superlink 127.0.0.1:9092 --insecure --isolation process --port 9094 --node-config 'market="de"'
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import types
from logging import ERROR, INFO
from typing import Any

DEFAULT_TASK_POLL = 0.05  # s between two AcquireTask calls that found nothing (loopback, ~1 ms each)


# ------------------------------------------------------------------------------------------ ClientApp
PULL_BACKOFF = (
    0.01,
    0.2,
)  # initial and largest wait between pulls of a message's objects (Flower: 1 s, 10 s)


def _pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """``flwr.supernode.runtime.run_clientapp.pull_task_input`` with a short retry backoff. A task is
    created (and acquired here within ``--poll``) as soon as the SuperNode has the message's header, before
    it has pulled the message's arrays from the SuperLink; Flower's pull then waits 1 s before its first
    retry, which ``flwr-clientapp`` rarely hits (its process starts for seconds) but a long-lived one
    always would."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF[0],
        backoff_cap=PULL_BACKOFF[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: not part of the deflated message
    return message, context, run, fab


class _Runner:
    """Runs ClientApp tasks in this process (one at a time, like the SuperNode hands them out)."""

    def __init__(self, address: str, insecure: bool, certificates: bytes | None) -> None:
        self.address = address
        self.insecure = insecure
        self.certificates = certificates
        self.installed: set[str] = set()  # FAB hashes installed under FLWR_HOME by this process
        self.tasks = 0

    def _client(self, token: str | None) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")
        ]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def acquire(self, client: Any) -> str | None:
        """One ClientApp task's token, or None if there is none pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return str(res.token)
        return None

    def run_task(self, token: str) -> None:
        """What ``flwr-clientapp --token TOKEN`` does (flwr.supernode.runtime.run_clientapp), minus the
        process exit: the app stays loaded for the next task."""
        from flwr.app import Error, Message
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from fedmarket.flower import client as market_client

        market_client.task_started()
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = _pull_task_input(client)
            if fab.hash_str not in self.installed:
                install_from_fab(fab.content, skip_prompt=True)
                self.installed.add(fab.hash_str)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app = load(run.fab_id, run.fab_version, fab.hash_str)  # the module stays imported
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # as flwr-clientapp: an error reply, the node goes on
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = (
                    ErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                    "An exception was raised when attempting to load `ClientApp`",
                )
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:
                log(ERROR, "Failed to push reply message", exc_info=ex)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks += 1

    def serve(self, poll: float, max_tasks: int | None = None) -> None:
        client = self._client(None)
        try:
            while max_tasks is None or self.tasks < max_tasks:
                try:
                    token = self.acquire(client)
                except Exception:  # the SuperNode is not up yet, or restarting: retry
                    token = None
                    time.sleep(max(poll, 0.5))
                if token is None:
                    time.sleep(poll)
                    continue
                self.run_task(token)
        finally:
            client.close()


def serve_clientapp(
    runtime_api_address: str,
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    poll: float = DEFAULT_TASK_POLL,
    parent_pid: int | None = None,
    max_tasks: int | None = None,
) -> None:
    """Serve a SuperNode's ClientApp tasks from this process until it is stopped (or its parent exits)."""
    from fedmarket.environment import apply_quiet_env

    apply_quiet_env()
    from flwr.supercore import log
    from flwr.supercore.app_utils import start_parent_process_monitor

    import fedmarket.flower.app  # noqa: F401 - import torch, flwr and the ClientApp once, before any task
    from fedmarket.flower.client import skip_dynamo_import

    skip_dynamo_import()
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    certificates = None
    if root_certificates and not insecure:
        with open(root_certificates, "rb") as f:
            certificates = f.read()
    log(INFO, "fedmarket long-lived ClientApp serving %s (poll %.3f s)", runtime_api_address, poll)
    _Runner(runtime_api_address, insecure, certificates).serve(poll, max_tasks)


# ------------------------------------------------------------------------------------------ SuperNode
def shorten_supernode_poll(poll: float) -> None:
    """Cap the sleeps of Flower 1.41's SuperNode loop (3 s between empty polls of the SuperLink, 0.5 s
    between checks for a reply) at ``poll`` seconds. Only that module's view of ``time`` changes."""
    from flwr.supernode import start_client_internal as loop

    real = loop.time
    if getattr(real, "_fedmarket_poll", None) is not None:
        real = real._real  # type: ignore[attr-defined]
    proxy = types.ModuleType("time")
    proxy.__dict__.update(real.__dict__)
    proxy.sleep = lambda seconds: real.sleep(min(seconds, poll))  # type: ignore[attr-defined]
    proxy._fedmarket_poll = poll  # type: ignore[attr-defined]
    proxy._real = real  # type: ignore[attr-defined]
    loop.time = proxy  # type: ignore[assignment]


def _runtime_port(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--port="):
            return arg.split("=", 1)[1]
    return "9094"  # flower-supernode's default Runtime API port


def run_supernode(argv: list[str], poll: float | None, clientapp: bool, task_poll: float) -> None:
    """``flower-supernode ARGV`` in this process, its idle poll capped at ``poll``; with ``clientapp``, the
    long-lived ClientApp as a child (the SuperNode must then run with ``--isolation process``)."""
    if clientapp and "process" not in [a.split("=")[-1] for a in argv if a.startswith("--isolation")] + [
        argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--isolation"
    ]:
        argv = [*argv, "--isolation", "process"]
    if clientapp:
        child = [
            sys.executable,
            "-m",
            "fedmarket.flower.worker",
            "clientapp",
            "--runtime-api-address",
            f"127.0.0.1:{_runtime_port(argv)}",
            "--insecure",  # the Runtime API on 127.0.0.1 is plain HTTP unless --ssl-certfile is given
            "--poll",
            str(task_poll),
            "--parent-pid",
            str(os.getpid()),
        ]
        proc = subprocess.Popen(child, stdin=subprocess.DEVNULL)  # same process group as this SuperNode

        def watch() -> None:  # a ClientApp that dies takes its SuperNode down: the node must not look alive
            code = proc.wait()
            print(
                f"long-lived ClientApp exited ({code}); stopping the SuperNode", file=sys.stderr, flush=True
            )
            os._exit(code or 1)

        threading.Thread(target=watch, daemon=True).start()
    if poll is not None:
        shorten_supernode_poll(poll)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fedmarket.flower.worker", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ca = sub.add_parser(
        "clientapp", help="a long-lived ClientApp for a SuperNode run with --isolation process"
    )
    ca.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    ca.add_argument(
        "--insecure", action="store_true", help="plain HTTP (the default without --root-certificates)"
    )
    ca.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API certificate")
    ca.add_argument("--poll", type=float, default=DEFAULT_TASK_POLL, help="s between task polls")
    ca.add_argument("--parent-pid", type=int, help="exit when this process exits")
    sn = sub.add_parser("supernode", help="flower-supernode with a shorter idle poll (args after --)")
    sn.add_argument("--poll-interval", type=float, help="cap on the SuperNode's sleeps (Flower: 3 s / 0.5 s)")
    sn.add_argument("--clientapp", action="store_true", help="also start the long-lived ClientApp")
    sn.add_argument("--task-poll", type=float, default=DEFAULT_TASK_POLL)
    sn.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.command == "clientapp":
        serve_clientapp(
            args.runtime_api_address,
            insecure=args.insecure or not args.root_certificates,  # the Runtime API is plain HTTP by default
            root_certificates=args.root_certificates,
            poll=args.poll,
            parent_pid=args.parent_pid,
        )
    else:
        rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
        run_supernode(rest, args.poll_interval, args.clientapp, args.task_poll)


if __name__ == "__main__":
    main()
