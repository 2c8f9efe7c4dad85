"""System metrics (CPU, memory, disk, network; GPU with pynvml) of a training, into its MLflow run.

MLflow's own :class:`~mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor` samples
them (its metric names: ``system/cpu_utilization_percentage``, ``system/system_memory_usage_megabytes``,
``system/gpu_0_utilization_percentage`` ...), but it sends each sample straight to the store and
stops for good at the first request that fails. Here the same monitors sample on the same thread
and every sample goes through the run's :class:`~dpo_engine.tracking.outbox.Outbox`, so an MLflow
outage loses none and holds up nothing; the loop runs until the training ends (a last sample
then, so even a short training has one).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

from dpo_engine.tracking.outbox import Outbox


def _monitor_class():
    """MLflow's monitor with its sampling loop and publishing routed through an outbox; raises
    ImportError without psutil (MLflow's CPU monitor needs it; the GPU one needs pynvml and is
    left out without it)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class OutboxMonitor(SystemMetricsMonitor):
        outbox: Outbox

        def monitor(self):
            """Sample every ``sampling_interval`` s, publish every ``samples_before_logging``
            samples, until :meth:`finish`: what was sampled by then is published too."""
            while not self._shutdown_event.is_set():
                try:
                    for _ in range(self.samples_before_logging):
                        self.collect_metrics()
                        if self._shutdown_event.wait(self.sampling_interval):
                            break
                    self.publish_metrics(self.aggregate_metrics())
                except Exception as e:  # noqa: BLE001 - a sampler never ends a training
                    logging.getLogger(__name__).warning("system metrics: a sample was not logged (%s)", e)
                    self._shutdown_event.wait(self.sampling_interval)

        def publish_metrics(self, metrics):
            prefix = self._metrics_prefix + (self.node_id + "/" if self.node_id else "")
            self.outbox.log_metrics({prefix + k: v for k, v in metrics.items()}, step=self._logging_step)
            self._logging_step += 1
            for m in self.monitors:
                m.clear_metrics()

        def finish(self):
            """Stop sampling (the last sample published): the outbox sends, nothing is flushed here."""
            self._shutdown_event.set()
            if self._process is not None:
                self._process.join(timeout=max(10.0, 2 * float(self.sampling_interval)))
                self._process = None

    return OutboxMonitor


@contextmanager
def system_metrics(outbox: Outbox | None, interval_s: float,
                   log: Callable[[str], None] = print) -> Iterator[object | None]:
    """Sample the machine every ``interval_s`` seconds (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    overrides it, as for MLflow's own monitor) into ``outbox``'s run while the block runs. Off
    (yields None) with no outbox, ``interval_s`` 0, or without psutil (said in one line). A run
    logged to again (a resumed training) continues its system metrics' steps."""
    if outbox is None or not interval_s:
        yield None
        return
    try:
        import psutil

        cls = _monitor_class()
    except ImportError as e:
        log(f"system metrics: not logged ({e.name or 'psutil'} is not installed)")
        yield None
        return
    quiet = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # "Skip logging GPU metrics ..." on every CPU training: not for the console
    try:
        try:
            monitor = cls(outbox.run_id, sampling_interval=interval_s, resume_logging=True)
        except Exception:  # noqa: BLE001 - the store not answering the resume lookup: start at step 0
            monitor = cls(outbox.run_id, sampling_interval=interval_s)
        monitor.outbox = outbox
        psutil.cpu_percent()  # its first call has nothing to compare with and says 0
        monitor.start()
    finally:
        quiet.setLevel(level)
    try:
        yield monitor
    finally:
        monitor.finish()
