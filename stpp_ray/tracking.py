"""Optional MLflow tracking of a run (`tracking.mlflow_uri`), from the driver.

One parent run per run directory, one nested run per stage. A stage's per-epoch metrics are
its `metrics.jsonl` (written by rank 0), followed while the stage trains and flushed when it
ends; the resolved config is the parent's params; the report and pictures are its artifacts.
`mlflow_run.json` in the run directory remembers the run ids, so a rerun of the same command
continues the same MLflow runs and logs each epoch once.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .config import Config
from .files import write_json_atomic
from .storage import local_copy, location

STATE_FILE = "mlflow_run.json"
SKIPPED_KEYS = {"stage", "epoch", "started_at", "val_iou"}  # not metrics, or not scalars


class TrackingError(RuntimeError):
    """The tracking store cannot be used (one line, naming the URI)."""


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings (lists and dicts as JSON), as MLflow params."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def scalar_metrics(record: dict) -> dict[str, float]:
    """The finite numeric entries of a record (a metrics.jsonl line, a stage's result)."""
    return {k: float(v) for k, v in record.items() if k not in SKIPPED_KEYS
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def redacted(uri: str) -> str:
    """The URI without a user:password part, for messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless opted in; a file:// URI is that opt-in here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise TrackingError(f"tracking.mlflow_uri is {redacted(uri)!r} but MLflow is not installed: "
                            "pip install 'stpp_ray[tracking]'") from err
    return MlflowClient(tracking_uri=uri)


class Tracker:
    """Logs one run directory to MLflow; `NullTracker` when tracking is off."""

    def __init__(self, cfg: Config, run_dir: Path, parent_run_id: str | None = None, extra_params: dict | None = None):
        t = cfg.tracking
        self.uri, self.run_dir = t.mlflow_uri, location(run_dir)
        self.state_path = self.run_dir / STATE_FILE
        fingerprint = cfg.fingerprint("method", "data", "model", "train", "selection", "label", "eval", "semi", "run")
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        try:
            self.client = _client(self.uri)
            experiment = self.client.get_experiment_by_name(t.experiment)
            self.experiment_id = (experiment.experiment_id if experiment is not None
                                  else self.client.create_experiment(t.experiment))
            if state.get("uri") == self.uri and state.get("fingerprint") == fingerprint and self._exists(state["run_id"]):
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.stages: dict[str, dict] = state.get("stages", {})
            else:
                tags = {"stpp_ray.output_dir": str(self.run_dir), "stpp_ray.method": cfg.method}
                if parent_run_id:
                    tags["mlflow.parentRunId"] = parent_run_id
                # tracking.run_name names the top run only: nested ones (a sweep's) keep their directories' names.
                name = self.run_dir.name if parent_run_id else t.run_name or self.run_dir.name
                run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
                self.run_id, self.stages = run.info.run_id, {}
                self._log_params({**flat_params(cfg.model_dump(exclude={"tracking"})), **(extra_params or {})})
        except TrackingError:
            raise
        except Exception as err:  # noqa: BLE001 - any store failure: one line naming the URI
            raise TrackingError(f"tracking.mlflow_uri {redacted(self.uri)!r}: {type(err).__name__}: "
                                f"{redacted(str(err))}".split("\n")[0]) from err
        self.fingerprint = fingerprint
        self._save()
        self._lock = threading.Lock()
        self._warned = False

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except Exception:  # noqa: BLE001 - deleted or never there
            return False

    def _save(self) -> None:
        write_json_atomic(self.state_path, {"uri": self.uri, "fingerprint": self.fingerprint,
                                            "experiment_id": self.experiment_id, "run_id": self.run_id,
                                            "stages": self.stages})

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _guarded(self, what: str, fn, *args) -> Any:
        """Tracking never stops training: a failed call is reported once, and skipped."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            if not self._warned:
                print(f"[tracking] {what} failed ({type(err).__name__}: {redacted(str(err))}); training goes on", flush=True)
                self._warned = True
            return None

    # ---- stages -----------------------------------------------------------------------
    def stage_started(self, name: str, stage_dir: Path | None, follow: bool = True) -> "StageFollower":
        entry = self.stages.get(name)
        if entry is None or not self._exists(entry["run_id"]):
            run = self._guarded("creating the stage's run", self.client.create_run, self.experiment_id,
                                None, {"mlflow.parentRunId": self.run_id}, name)
            if run is None:
                return StageFollower(None, None, None, 0)
            entry = {"run_id": run.info.run_id, "logged_epochs": 0}
            with self._lock:
                self.stages[name] = entry
                self._save()
        return StageFollower(self, entry, stage_dir, entry["logged_epochs"], follow=follow)

    def stage_finished(self, follower: "StageFollower", result: dict, status: str = "FINISHED") -> None:
        follower.stop()
        if follower.entry is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        summary = [Metric(f"result.{k}", v, now, 0) for k, v in scalar_metrics(result).items()]
        run_id = follower.entry["run_id"]
        if summary:
            self._guarded("logging the stage's result", self.client.log_batch, run_id, summary)
        self._guarded("closing the stage's run", self.client.set_terminated, run_id, status)
        if status == "FINISHED":
            with self._lock:
                follower.entry["finished"] = True
                self._save()

    def stage_reused(self, name: str, stage_dir: Path | None, result: dict) -> None:
        """A stage done by an earlier run: logged now unless that run logged it to the end."""
        if not self.stages.get(name, {}).get("finished"):
            self.stage_finished(self.stage_started(name, stage_dir, follow=False), result)

    def finish(self, artifacts: list[str], metrics: dict, status: str = "FINISHED") -> None:
        """Files of the run directory as artifacts, summary metrics; the parent run ends."""
        for name in artifacts:
            if (self.run_dir / name).is_file():
                with local_copy(self.run_dir / name) as path:
                    self._guarded("uploading artifacts", self.client.log_artifact, self.run_id, str(path))
        for key, value in scalar_metrics(metrics).items():
            self._guarded("logging a summary metric", self.client.log_metric, self.run_id, key, value)
        self._guarded("closing the run", self.client.set_terminated, self.run_id, status)

    def failed(self) -> None:
        self._guarded("closing the run", self.client.set_terminated, self.run_id, "FAILED")

    def _log_epochs(self, entry: dict, records: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, int(1000 * r.get("started_at", time.time())), int(r["epoch"]))
                   for r in records for k, v in scalar_metrics(r).items()]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(entry["run_id"], metrics=metrics[i:i + 900])
        with self._lock:
            entry["logged_epochs"] = int(records[-1]["epoch"])
            self._save()


class StageFollower:
    """Logs the epochs a stage appends to its metrics.jsonl, every few seconds and at the end."""

    def __init__(self, tracker: Tracker | None, entry: dict | None, stage_dir: Path | None, logged: int,
                 interval_s: float = 10.0, follow: bool = True):
        self.tracker, self.entry, self.logged = tracker, entry, logged
        self.path = location(stage_dir) / "metrics.jsonl" if stage_dir else None
        self._stop = threading.Event()
        self._thread = None
        if follow and tracker is not None and self.path is not None:
            self._thread = threading.Thread(target=self._follow, args=(interval_s,), daemon=True, name="mlflow-follower")
            self._thread.start()

    def _follow(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.flush()

    def flush(self) -> None:
        if self.tracker is None or self.path is None or not self.path.exists():
            return
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                break
            if int(record.get("epoch", 0)) > self.logged:
                records.append(record)
        if records:
            self.tracker._guarded("logging epoch metrics", self.tracker._log_epochs, self.entry, records)
            self.logged = max(self.logged, int(records[-1]["epoch"]))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()


class NullTracker:
    """Tracking off: every call does nothing."""

    def stage_started(self, name: str, stage_dir: Path | None) -> StageFollower:
        return StageFollower(None, None, None, 0)

    def stage_finished(self, follower: StageFollower, result: dict, status: str = "FINISHED") -> None:
        pass

    def stage_reused(self, name: str, stage_dir: Path | None, result: dict) -> None:
        pass

    def finish(self, artifacts: list[str], metrics: dict, status: str = "FINISHED") -> None:
        pass

    def failed(self) -> None:
        pass


def make_tracker(cfg: Config, run_dir: Path, parent_run_id: str | None = None, extra_params: dict | None = None):
    """A `Tracker` when `tracking.mlflow_uri` is set, else a `NullTracker`."""
    if not cfg.tracking.mlflow_uri:
        return NullTracker()
    return Tracker(cfg, run_dir, parent_run_id, extra_params)
