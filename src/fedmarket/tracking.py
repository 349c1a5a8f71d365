"""Record finished run folders in MLflow (``tracking: mlflow`` in a config, or `log_run_dir` by hand).

Everything is read back from the run folder's files (``config.yaml``, ``metrics.json``, ``seeds/seed<N>.json``,
``report.md``, plots), never from the objects of a training process, so a resumed run, a merged run folder or
one finished long ago is logged exactly like a run that just ended, and the run folder stays the record: MLflow
is a view of it.

Layout in MLflow: one parent run per run folder (run name = the folder's name) with the flattened config as
params, the test metrics (mean over seeds, ``test/average/<metric>`` and ``test/<market>/<metric>``), the bytes
every market uploaded and downloaded, ε when differential privacy was on, and ``report.md``, ``metrics.json``,
``config.yaml``, ``rounds.csv`` and the PNG plots as artifacts; one nested child run per seed (``seed<N>``)
with each round's validation metrics per market as metric series (``valid/<market>/<metric>``, step = round),
the bytes uploaded and downloaded in each round, and the seed's test metrics.

MLflow metric names may not hold ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``.

A folder or a ``.db`` path as the URI means a local SQLite store (``<folder>/mlflow.db``, artifacts in
``<folder>/artifacts``): MLflow's plain file store refuses new data unless the user opts in to it
(``MLFLOW_ALLOW_FILE_STORE``), and a SQLite store needs nothing beyond ``mlflow-skinny``. Any other URI
(``sqlite:///…``, ``http://…``, ``file:…``) is passed to MLflow unchanged.

Logging the same run folder again (e.g. ``--resume`` of a run whose seeds had all finished) finds the first
record by the folder's path and seed records and adds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from fedmarket.errors import ConfigError, FedmarketError

log = logging.getLogger(__name__)

__all__ = ["log_run_dir", "require_packages", "resolve_tracking_uri", "track_run"]

PARENT_ARTIFACTS = ("report.md", "metrics.json", "config.yaml", "rounds.csv")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RUN_KEY_TAG = "fedmarket.run_key"


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module entry without a spec (e.g. set to None): not importable either
        return False


def require_packages(uri: str = "mlruns") -> None:
    """A one-line ConfigError naming what to install when MLflow, or for a local SQLite store (a plain path
    or ``sqlite:`` URI) SQLAlchemy and Alembic, cannot be imported. Checked when a config turns tracking on,
    so a run never trains for hours to fail at its end; cheap: nothing is imported."""
    needed = {"mlflow": "mlflow-skinny"}
    if resolve_tracking_uri(uri)[0].startswith("sqlite:"):
        needed.update({"sqlalchemy": "sqlalchemy", "alembic": "alembic"})  # mlflow-skinny leaves them out
    missing = [package for module, package in needed.items() if not _importable(module)]
    if missing:
        extra = " (or the extra: pip install 'fedmarket[tracking]')" if missing == ["mlflow-skinny"] else ""
        raise ConfigError(
            f"tracking: mlflow needs {', '.join(missing)}: pip install {' '.join(missing)}{extra}"
        )


def _mlflow(uri: str) -> Any:
    require_packages(uri)
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(
            f"mlflow cannot be imported ({_one_line(exc)}): pip install mlflow-skinny"
        ) from None
    return MlflowClient


def resolve_tracking_uri(uri: str) -> tuple[str, str | None]:
    """The MLflow tracking URI for ``uri`` and the artifact location for a new experiment (None: MLflow's
    default). A plain path is a local SQLite store: ``x.db`` as is, a folder as ``<folder>/mlflow.db``; the
    artifacts go to ``artifacts/`` next to the database, so the store is one self-contained folder."""
    uri = str(uri).strip()
    scheme = urlparse(uri).scheme
    if len(scheme) > 1:  # a URI (one letter is a Windows drive)
        if scheme == "sqlite" and uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
            db = Path(uri[len("sqlite:///") :]).expanduser().absolute()
            return uri, (db.parent / "artifacts").as_uri()
        return uri, None
    path = Path(uri).expanduser().absolute()
    db = path if path.suffix == ".db" else path / "mlflow.db"
    return f"sqlite:///{db}", (db.parent / "artifacts").as_uri()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces): ``ndcg@10`` → ``ndcg_at_10``."""
    return re.sub(r"[^\w\-./: ]", "_", str(name).replace("@", "_at_"))[:250]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``{"train": {"lr": 0.01}}`` → ``("train.lr", "0.01")``; lists and empty mappings as JSON text."""
    if isinstance(obj, Mapping) and obj:
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    yield _metric_name(prefix), text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FedmarketError(f"{path}: cannot read it as JSON ({_one_line(exc)})") from None


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """metrics.json, the config and every seed record of a finished run folder (an error names what is
    missing)."""
    if not (run_dir / "metrics.json").is_file():
        raise FedmarketError(f"{run_dir} is not a finished run folder: metrics.json is missing")
    metrics = _read_json(run_dir / "metrics.json")
    config = metrics.get("config") or {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or config
    records = []
    for seed in metrics.get("seeds") or []:
        path = run_dir / "seeds" / f"seed{seed}.json"
        if not path.is_file():
            raise FedmarketError(f"{path} is missing: seed {seed} of {run_dir} did not finish")
        records.append(_read_json(path))
    return metrics, config, records


def _run_key(run_dir: Path) -> str:
    """The folder's path and seed records: the same finished run gives the same key, a run with other
    seeds or results another."""
    sha = hashlib.sha1(str(run_dir.resolve()).encode())
    for path in sorted((run_dir / "seeds").glob("seed*.json")):
        sha.update(path.name.encode())
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _test_metrics(per_market: Mapping[str, Any], average: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for market, values in [*per_market.items(), ("average", average)]:
        for metric, value in (values or {}).items():
            number = _number(value)
            if number is not None:
                out[_metric_name(f"test/{market}/{metric}")] = number
    return out


def _seed_series(record: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(name, value, round) of a seed's validation history, the mean over the markets evaluated in a round,
    and the bytes moved in each round (in total and per market)."""
    series: list[tuple[str, float, int]] = []
    by_round: dict[tuple[int, str], list[float]] = {}
    for row in record.get("history") or []:
        step, market = int(row.get("round", 0)), str(row.get("market", ""))
        split = str(row.get("split") or "valid")
        for key, value in row.items():
            number = _number(value)
            if key in ("seed", "round") or number is None:
                continue
            series.append((_metric_name(f"{split}/{market}/{key}"), number, step))
            by_round.setdefault((step, _metric_name(f"{split}/average/{key}")), []).append(number)
    series += [(name, sum(v) / len(v), step) for (step, name), v in by_round.items()]
    sent: dict[tuple[int, str], float] = {}
    for upload in record.get("uploads") or []:
        step, market = int(upload.get("round", 0)), str(upload.get("market", ""))
        for field, name in (("bytes", "up_bytes"), ("down_bytes", "down_bytes")):
            number = _number(upload.get(field))
            if number is not None:
                for key in (name, f"{name}/{market}"):
                    sent[(step, _metric_name(key))] = sent.get((step, _metric_name(key)), 0.0) + number
    series += [(name, value, step) for (step, name), value in sent.items()]
    return series


def _communication(communication: Mapping[str, Any]) -> dict[str, float]:
    totals = {"up_bytes": 0.0, "down_bytes": 0.0}
    for values in communication.values():
        for key in totals:
            totals[key] += _number((values or {}).get(key)) or 0.0
    return totals


class _Logger:
    """Batches of params and metrics within MLflow's per-call limits."""

    def __init__(self, client: Any) -> None:
        from mlflow.entities import Metric, Param

        self.client, self.Metric, self.Param = client, Metric, Param
        self.now = int(time.time() * 1000)

    def params(self, run_id: str, params: dict[str, str]) -> None:
        items = [self.Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def metrics(self, run_id: str, values: list[tuple[str, float, int]]) -> None:
        items = [self.Metric(name, value, self.now, step) for name, value, step in values]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise FedmarketError(
                f"MLflow experiment {name!r} is deleted; restore it or choose another tracking_experiment"
            )
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def log_run_dir(run_dir: str | Path, uri: str = "mlruns", experiment: str | None = None) -> str:
    """Log a finished run folder to MLflow: one parent run, one nested child run per seed (module docstring).
    ``uri``: a folder or ``.db`` file (a local SQLite store) or any MLflow tracking URI; ``experiment``: the
    MLflow experiment, default the run's config name. Returns the parent run's id (that of the earlier
    record when this folder, with the same seed records, was logged before).

    Raises ConfigError when mlflow is not installed and FedmarketError (one line) when the folder is not a
    finished run or the tracking backend fails; runs created before a failure are deleted, so MLflow never
    holds half a record."""
    client_class = _mlflow(uri)
    run_dir = Path(run_dir)
    metrics, config, records = _read_run(run_dir)
    tracking_uri, artifact_location = resolve_tracking_uri(uri)
    name = experiment or str(metrics.get("name") or config.get("name") or run_dir.name)
    created: list[str] = []
    client = None
    try:
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        client = client_class(tracking_uri=tracking_uri)
        experiment_id = _experiment_id(client, name, artifact_location)
        key = _run_key(run_dir)
        earlier = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
        )
        if earlier and earlier[0].info.status == "FINISHED":
            log.info("%s is logged in MLflow already (run %s)", run_dir, earlier[0].info.run_id)
            return earlier[0].info.run_id
        tags = {
            RUN_KEY_TAG: key,
            "fedmarket.run_dir": str(run_dir.resolve()),
            **{
                f"fedmarket.{k}": str(metrics[k])
                for k in ("label", "method", "dataset", "model", "private", "data_fingerprint")
                if metrics.get(k) is not None
            },
        }
        parent = client.create_run(experiment_id, tags=tags, run_name=run_dir.name).info.run_id
        created.append(parent)
        logger = _Logger(client)
        logger.params(parent, dict(_flatten(config)))
        summary = _test_metrics(metrics.get("per_market") or {}, metrics.get("average") or {})
        summary.update(
            {
                _metric_name(f"test/average/{k}_std"): v
                for k, v in (metrics.get("average_std") or {}).items()
                if _number(v) is not None
            }
        )
        summary.update(_communication(metrics.get("communication") or {}))
        epsilon = _number((metrics.get("privacy") or {}).get("epsilon"))
        if epsilon is not None:
            summary["epsilon"] = epsilon
        if _number(metrics.get("seconds")) is not None:
            summary["seconds"] = float(metrics["seconds"])
        logger.metrics(parent, [(k, v, 0) for k, v in summary.items()])
        for record in records:
            seed = int(record["seed"])
            child = client.create_run(
                experiment_id,
                tags={
                    **{k: v for k, v in tags.items() if k != RUN_KEY_TAG},  # the key finds the parent only
                    "mlflow.parentRunId": parent,
                    "fedmarket.seed": str(seed),
                },
                run_name=f"seed{seed}",
            ).info.run_id
            created.append(child)
            logger.params(child, {"seed": str(seed)})
            values = _seed_series(record)
            final = _test_metrics(record.get("test") or {}, _average(record.get("test") or {}))
            seed_epsilon = _number((record.get("privacy") or {}).get("epsilon"))
            if seed_epsilon is not None:
                final["epsilon"] = seed_epsilon
            if _number(record.get("selected_round")) is not None:
                final["selected_round"] = float(record["selected_round"])
            logger.metrics(child, values + [(k, v, 0) for k, v in final.items()])
            client.set_terminated(child, "FINISHED")
        for file in [*(run_dir / n for n in PARENT_ARTIFACTS), *sorted(run_dir.glob("*.png"))]:
            if file.is_file():
                client.log_artifact(parent, str(file))
        client.set_terminated(parent, "FINISHED")
    except Exception as exc:
        for run_id in created:  # no half record: a parent without its seeds, or seeds without artifacts
            try:
                client.delete_run(run_id)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        if isinstance(exc, FedmarketError):
            raise
        raise FedmarketError(
            f"could not log {run_dir} to MLflow at {tracking_uri}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    return parent


def _average(test: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    from fedmarket.eval.metrics import average_over_markets

    return average_over_markets({m: dict(v) for m, v in test.items()})


def track_run(cfg: Any, run_dir: str | Path) -> str | None:
    """The end of a run (`fedmarket.api.run_experiment`): log the run folder when the config's ``tracking``
    asks for it. A tracking failure is a one-line warning, never an error: the run folder is already
    complete and stays the record (log it later with `log_run_dir`). Returns the parent run's id or None."""
    if getattr(cfg, "tracking", "none") != "mlflow":
        return None
    try:
        return log_run_dir(run_dir, cfg.tracking_uri, cfg.tracking_experiment or cfg.name)
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises, the run folder must survive
        log.warning(
            "could not log %s to MLflow (the run folder is complete; retry with "
            "fedmarket.tracking.log_run_dir): %s",
            run_dir,
            _one_line(exc),
        )
        return None
