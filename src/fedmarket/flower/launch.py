"""Start Flower on 127.0.0.1 and run an experiment on it: ``fedmarket flower simulate|deploy CONFIG``.

- simulation: one ``flower-superlink --simulation`` (Ray backend, one simulated SuperNode per market with
  ``partition-id`` = the market's index in ``dataset.markets``, 1 CPU each);
- deployment: one ``flower-superlink`` and one ``flower-supernode --node-config 'market="<m>" ...'`` per market,
  each a separate process, optionally over TLS with certificates generated here. By default each SuperNode
  runs with ``--isolation process`` and one long-lived ClientApp process (`fedmarket.flower.worker`) that
  serves all its messages, instead of Flower's fresh ClientApp process per message (``clientapp=
  "per-message"``); ``poll_interval`` shortens the SuperNode's 3 s idle poll of the SuperLink.

Every process is started in its own session and stopped by its process-group id (= the pid we started;
the group holds only that process and the children it spawned: SuperExec, ServerApp, ClientApp processes),
on success, on error and on Ctrl-C. Nothing else on the machine is touched. Environment: telemetry and update
checks off, ``FLWR_HOME`` inside the run folder, runtime dependency installation off (it would install a
CUDA torch).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedmarket.api import new_run_dir, prepare_data
from fedmarket.config import ExperimentConfig
from fedmarket.errors import FedmarketError

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}

APP_PYPROJECT = """\
# Written by fedmarket: a minimal Flower app whose components live in the installed fedmarket package.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmarket-flower"
version = "0.1.0"
# empty on purpose: the SuperLink runs with runtime dependency installation disabled, and torch must never
# be resolved by uv here (it would pull a CUDA build); fedmarket is installed on every machine beforehand
dependencies = []

[tool.flwr.app]
publisher = "fedmarket"

[tool.flwr.app.components]
serverapp = "fedmarket.flower.app:server_app"
clientapp = "fedmarket.flower.app:client_app"

[tool.flwr.app.config]
run-dir = ""
config = ""
resume = false
reply-timeout = 600.0
wait-nodes = 120.0
state-dir = ""
market-nodes = ""
"""


CLIENTAPP_MODES = ("long-lived", "per-message")


def _bin(name: str) -> str:
    """A Flower executable next to this interpreter (the venv), else on PATH."""
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FedmarketError(f"{name} not found: install the flower extra (pip install 'fedmarket[flower]')")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------ TLS
@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate SuperNodes and `flwr` trust (--root-certificates / root-certificates)
    cert: Path  # the SuperLink's certificate, signed by the CA (--ssl-certfile)
    key: Path  # the SuperLink's private key (--ssl-keyfile)


def make_certificates(
    out_dir: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30
) -> Certificates:
    """A self-signed CA and a SuperLink certificate for ``hosts`` (IPs or DNS names), PEM files in
    ``out_dir``. For real machines use your own CA and the SuperLink's public name (see README)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmarket test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(out_dir / "ca.pem", out_dir / "superlink.pem", out_dir / "superlink.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(paths.key, 0o600)
    return paths


def make_node_keys(out_dir: Path, markets: list[str]) -> dict[str, tuple[Path, Path]]:
    """One SuperNode key pair per market (ECDSA P-384, OpenSSH format, as Flower's SuperNode authentication
    expects): ``<market>`` (private, mode 600) and ``<market>.pub``. Kept across a resume."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = {}
    for market in markets:
        private, public = out_dir / market, out_dir / f"{market}.pub"
        if not (private.exists() and public.exists()):
            key = ec.generate_private_key(ec.SECP384R1())
            private.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
            )
            private.chmod(0o600)
            public.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
                )
            )
        keys[market] = (private, public)
    return keys


# ------------------------------------------------------------------------------------------ processes
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, each started in its own session and stopped by its pid."""

    def __init__(
        self,
        home: Path,
        *,
        simulation: bool = False,
        tls: bool = False,
        auth: bool = False,
        extra_env: dict[str, str] | None = None,
        clientapp: str = "long-lived",
        poll_interval: float | None = None,
    ) -> None:
        """``clientapp``: "long-lived" (one ClientApp process per SuperNode serves every message, see
        `fedmarket.flower.worker`) or "per-message" (Flower's default: a fresh process per message).
        ``poll_interval``: cap, in seconds, on the SuperNode's sleeps between polls of the SuperLink
        (Flower 1.41: 3 s when no message came, 0.5 s between checks for a reply); None keeps Flower's."""
        if auth and not tls:
            raise FedmarketError("SuperNode authentication (--auth) needs TLS (--tls)")
        if clientapp not in CLIENTAPP_MODES:
            raise FedmarketError(f"clientapp must be one of {CLIENTAPP_MODES}, got {clientapp!r}")
        if poll_interval is not None and not 0.01 <= poll_interval <= 60:
            raise FedmarketError(f"poll_interval must be within 0.01-60 s, got {poll_interval}")
        self.clientapp = clientapp
        self.poll_interval = poll_interval
        self.auth = auth
        self.home = home.absolute()
        self.home.mkdir(parents=True, exist_ok=True)
        self.simulation = simulation
        self.logs = self.home / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(self.home / "flwr-home"),
            # Flower starts its own helpers (flower-superexec, flwr-clientapp) by name
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
        self.certs = make_certificates(self.home / "certs") if tls else None
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        self.supernode_args: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        if name in self.processes and self.processes[name].poll() is None:
            raise FedmarketError(f"process {name!r} is already running")
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopping it stops exactly its children too
        )
        log.close()
        self.processes[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Stop a process we started, and the children in its process group, by its pid."""
        proc = self.processes.get(name)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):  # SuperNodes first, then the SuperLink
            self.stop(name)
        # The SuperLink starts its SuperExec detached (its own session), out of reach of killpg. It is
        # still ours: it carries this federation's unique FLWR_HOME, which nothing else on the machine has.
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.leftover_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """Live processes started by this federation (environment holds its FLWR_HOME), zombies excluded."""
        return processes_with_env("FLWR_HOME", self.env["FLWR_HOME"])

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # ------------------------------------------------------------------ Flower processes
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, timeout: float = 60.0) -> None:
        argv = [
            _bin("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            "--database",
            str(self.home / "superlink-state.db"),
        ]
        if self.simulation:
            argv.append("--simulation")
        if self.auth:  # only SuperNodes whose public key is registered may connect
            argv.append("--enable-supernode-auth")
        if self.certs:
            argv += [
                "--ssl-ca-certfile",
                str(self.certs.ca),
                "--ssl-certfile",
                str(self.certs.cert),
                "--ssl-keyfile",
                str(self.certs.key),
            ]
        else:
            argv.append("--insecure")
        proc = self.start("superlink", argv)
        self._wait_health(proc, timeout)

    def _wait_health(self, proc: subprocess.Popen, timeout: float) -> None:
        import httpx

        scheme = "https" if self.certs else "http"
        verify: Any = str(self.certs.ca) if self.certs else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedmarketError(
                    f"flower-superlink exited ({proc.returncode}):\n{self.log_tail('superlink')}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{scheme}://{self.address}/health", timeout=1.0, verify=verify).is_success:
                    return
            time.sleep(0.2)
        raise FedmarketError(
            f"flower-superlink not ready after {timeout:.0f} s:\n{self.log_tail('superlink')}"
        )

    def start_supernode(
        self,
        market: str,
        *,
        data_dir: str | None = None,
        state_dir: Path | None = None,
        root_certificates: Path | None | str = "default",
        max_wait_time: float | None = None,
        name: str | None = None,
        private_key: Path | None = None,
    ) -> subprocess.Popen:
        """One SuperNode serving ``market``. ``root_certificates`` overrides the CA it trusts (a wrong CA,
        or None for the system bundle) — for the TLS refusal test."""
        state_dir = state_dir or self.home / "market-state" / market
        node_config = f'market="{market}" state-dir="{state_dir}"'
        if data_dir:
            node_config += f' data-dir="{data_dir}"'
        argv = [
            "--superlink",
            self.address,
            "--port",  # the SuperNode's Runtime API, which its ClientApp(s) connect to
            str(free_port()),
            "--node-config",
            node_config,
        ]
        if self.clientapp == "long-lived" or self.poll_interval is not None:
            # Flower's SuperNode run by fedmarket.flower.worker: the same code, its idle poll capped, and
            # with --clientapp one long-lived ClientApp process as its child (same process group)
            wrapper = [sys.executable, "-m", "fedmarket.flower.worker", "supernode"]
            if self.poll_interval is not None:
                wrapper += ["--poll-interval", str(self.poll_interval)]
            if self.clientapp == "long-lived":
                wrapper.append("--clientapp")
                argv += ["--isolation", "process"]
            argv = [*wrapper, "--", *argv]
        else:
            argv = [_bin("flower-supernode"), *argv]
        if max_wait_time is not None:
            argv += ["--max-wait-time", str(max_wait_time)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if self.certs is None:
            argv.append("--insecure")
        elif root_certificates == "default":
            argv += ["--root-certificates", str(self.certs.ca)]
        elif root_certificates is not None:
            argv += ["--root-certificates", str(root_certificates)]
        name = name or f"supernode-{market}"
        self.supernode_args[name] = argv
        return self.start(name, argv)

    def restart(self, name: str) -> subprocess.Popen:
        return self.start(name, self.supernode_args[name])

    # ------------------------------------------------------------------ flwr run
    def register_node(self, public_key: Path, timeout: float = 120.0) -> int:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); its node id."""
        self.write_cli_config()
        proc = subprocess.run(
            [_bin("flwr"), "supernode", "register", str(public_key)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        found = re.search(r"SuperNode (\d+) registered", proc.stdout + proc.stderr)
        if proc.returncode or not found:
            raise FedmarketError(
                f"could not register {public_key.name} with the SuperLink: {(proc.stdout + proc.stderr).strip()[-300:]}"
            )
        return int(found.group(1))

    def write_cli_config(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            "[superlink]",
            'default = "fedmarket"',
            "",
            "[superlink.fedmarket]",
            f'address = "{self.address}"',
        ]
        if self.certs:
            lines.append(f'root-certificates = "{self.certs.ca}"')
        else:
            lines.append("insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def submit(
        self, app_dir: Path, run_config: dict[str, Any], num_markets: int | None = None
    ) -> subprocess.Popen:
        """``flwr run APP fedmarket --stream`` (non-blocking; its log is ``logs/flwr-run.log``)."""
        self.write_cli_config()
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        argv = [_bin("flwr"), "run", str(app_dir), "fedmarket", "--stream", "--run-config", overrides]
        if self.simulation:
            if not num_markets:
                raise FedmarketError("simulation needs the number of markets")
            argv += ["--federation-config", f"num-supernodes={num_markets} client-resources-num-cpus=1"]
        return self.start("flwr-run", argv)


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids of live (non-zombie) processes of this user whose environment has ``key=value`` (Linux /proc)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry.name))
    return found


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_app_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(APP_PYPROJECT)
    return path


# ------------------------------------------------------------------------------------------ one call
def prepare_flower_run(
    cfg: ExperimentConfig, run_dir: Path | None, resume: bool
) -> tuple[ExperimentConfig, Path]:
    """Resolve what the ServerApp and the ClientApps must agree on, then write the run folder's config.

    ``dataset.markets`` is resolved to an explicit list (simulation maps partition-id into it) and
    ``dataset.data_dir`` made absolute (Flower processes run elsewhere)."""
    if resume:
        if run_dir is None or not (run_dir / "config.yaml").exists():
            raise FedmarketError(f"cannot resume {run_dir}: no config.yaml")
        from fedmarket.api import load_run_config

        return load_run_config(run_dir), run_dir
    if cfg.dataset.markets is None:
        cfg.dataset.markets = list(prepare_data(cfg).splits)
    if cfg.dataset.data_dir:
        cfg.dataset.data_dir = str(Path(cfg.dataset.data_dir).absolute())
    cfg.output_dir = str(Path(cfg.output_dir).absolute())
    run_dir = run_dir or new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, run_dir


def run_on_flower(
    cfg: ExperimentConfig,
    mode: str = "deployment",
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 3600.0,
    reply_timeout: float = 600.0,
    clientapp: str = "long-lived",
    poll_interval: float | None = None,
) -> Path:
    """Run ``cfg`` on a fresh local Flower federation (``mode`` = "simulation" or "deployment") and return
    the run folder (same format as ``fedmarket run``, plus ``flower/`` with logs and ``flower_timing.json``).
    ``clientapp`` and ``poll_interval``: how the deployment's SuperNodes run their ClientApp and how often
    they poll the SuperLink (`LocalFederation`); simulation ignores both."""
    if mode not in ("simulation", "deployment"):
        raise FedmarketError(f"mode must be 'simulation' or 'deployment', got {mode!r}")
    cfg, run_dir = prepare_flower_run(cfg, run_dir, resume)
    run_dir = run_dir.absolute()
    markets = list(cfg.dataset.markets or [])
    home = run_dir / "flower"
    if resume:  # the dead SuperLink's own state (runs, node registrations) is of no use: ours is in run_dir
        for stale in [*home.glob("superlink-state.db*"), run_dir / "flower_error.json"]:
            stale.unlink(missing_ok=True)
    if auth and mode != "deployment":
        raise FedmarketError("SuperNode authentication (--auth) is for deployment, not simulation")
    with LocalFederation(
        home,
        simulation=mode == "simulation",
        tls=tls,
        auth=auth,
        clientapp=clientapp,
        poll_interval=poll_interval,
    ) as fed:
        fed.start_superlink()
        bound: dict[str, int] = {}
        if mode == "deployment":
            keys = make_node_keys(home / "node-keys", markets) if auth else {}
            for market in markets:
                if auth:  # each market's key is registered, and the market bound to that node
                    bound[market] = fed.register_node(keys[market][1])
                fed.start_supernode(
                    market, data_dir=cfg.dataset.data_dir, private_key=keys[market][0] if auth else None
                )
        run_config = {
            "run-dir": str(run_dir),
            "resume": resume,
            "reply-timeout": float(reply_timeout),
            "state-dir": str(home / "market-state"),
            "market-nodes": ",".join(f"{m}:{n}" for m, n in bound.items()),
        }
        proc = fed.submit(write_app_dir(home / "app"), run_config, num_markets=len(markets))
        wait_for_run(fed, proc, run_dir, timeout)
    return run_dir


def wait_for_run(fed: LocalFederation, proc: subprocess.Popen, run_dir: Path, timeout: float) -> None:
    """Wait for ``flwr run --stream`` to end and the run folder to be complete; raise with the logs if not."""
    deadline = time.monotonic() + timeout
    superlink = fed.processes.get("superlink")
    while time.monotonic() < deadline:
        if (run_dir / "metrics.json").exists() and proc.poll() is not None:
            return
        if superlink is not None and superlink.poll() is not None:  # a dead SuperLink never answers again
            break
        if (run_dir / "flower_error.json").exists() or (proc.poll() is not None and proc.returncode != 0):
            break
        if proc.poll() is not None:  # stream ended; give the ServerApp a moment to finish writing
            end = time.monotonic() + 30
            while time.monotonic() < end and not (run_dir / "metrics.json").exists():
                if (run_dir / "flower_error.json").exists():
                    break
                time.sleep(0.2)
            if (run_dir / "metrics.json").exists():
                return
            break
        time.sleep(0.2)
    error = ""
    if (run_dir / "flower_error.json").exists():
        error = (run_dir / "flower_error.json").read_text()
    if superlink is not None and superlink.poll() is not None:
        error += (
            f"the SuperLink exited ({superlink.returncode}); continue the run with "
            f"`fedmarket flower {'simulate' if fed.simulation else 'deploy'} --resume {run_dir}`"
        )
    raise FedmarketError(
        f"the Flower run did not complete ({'timed out' if time.monotonic() >= deadline else 'failed'}) {error}\n"
        f"--- flwr run log:\n{fed.log_tail('flwr-run')}\n--- superlink log:\n{fed.log_tail('superlink', 1500)}"
    )
