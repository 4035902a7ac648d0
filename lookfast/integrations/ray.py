"""Batch inference on Ray Data (`pip install 'lookfast[ray]'`): the same job as `python -m lookfast infer`, with the
model replicated over an actor pool.

    paths -> ray.data.from_items([{"path": ...}]) -> map_batches(Predictor, compute=ActorPoolStrategy(size=N))
          -> rows streamed back to the driver, written by the same writer as a single-process run

`Predictor` is a Ray Data callable class: the model and its serving Engine are created once per actor in `__init__`,
each `__call__(batch)` decodes that batch's images (in the actor, so the paths must be readable on every node: a
shared file system), submits them to the engine and returns their rows as a pyarrow Table. Two calls run at once per
actor (threads; the engine is thread-safe), so one batch is decoded while the previous one computes. Each actor reserves `threads` CPUs and runs torch with that many threads, so
the actors together never oversubscribe the cores. Ray Data restarts an actor that dies and retries its task
(max_restarts / max_task_retries default to unlimited for actor pools), and the driver only receives a task's rows
once it has succeeded, so every image is written exactly once.

The rows come back to the driver rather than being written by the actors (`write_parquet`): they are small (about
200 bytes an image), and the driver's writer gives both paths one format, one progress bar and `--resume`.
Segmentation masks are written by the actors (mask_dir must be shared storage on a multi-node cluster).

Importing this module does not import Ray; `import lookfast` never imports this module.
"""
from __future__ import annotations

import math
import os
import warnings

from ..infer.outputs import rows_to_table, table_to_rows
from ..infer.predict import InferSettings, Worker
from ..infer.run import IN_FLIGHT_BATCHES

__all__ = ["Predictor", "run_on_ray", "local_cpus"]


def _ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError("--ray needs Ray Data: pip install 'lookfast[ray]' (or pip install 'ray[data]')") from exc
    return ray


def local_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Predictor:
    """Ray Data callable class: `Predictor(settings, threads)` loads the model once; `__call__(batch)` takes a batch
    {"path": array of str} and returns a pyarrow Table of rows (lookfast.infer.outputs.arrow_schema())."""

    def __init__(self, settings: InferSettings, threads: int = 1):
        import torch

        from ..memory import keep_freed_cpu_memory

        torch.set_num_threads(max(1, int(threads)))
        keep_freed_cpu_memory()  # a long-lived worker process: reuse freed activations (lookfast.memory)
        self.worker = Worker(settings)

    def __call__(self, batch: dict):
        """batch {"path": array of str} -> pyarrow Table of one row per path, in order (arrow_schema())."""
        # Up to IN_FLIGHT_BATCHES calls run at once in this actor (threads), all submitting to the one engine: while
        # it runs one batch the next one is decoded, and its later stages fill with survivors of several batches.
        return rows_to_table(self.worker([str(p) for p in batch["path"]]))


def run_on_ray(settings: InferSettings, paths: list[str], writer, summary, bar, address: str, actors: int,
               threads: int | None = None, predictor_cls=None) -> None:
    """Predict `paths` on Ray Data with `actors` replicas, writing the rows with `writer` as they arrive.

    address: "local" starts a Ray on this machine with this process's CPUs; "auto", "host:port" or "ray://..."
    connects to a cluster; "" lets ray.init() choose (RAY_ADDRESS or a running local cluster, else a new one). When
    Ray is already initialised in this process, that session is used and left running. threads: torch threads (and
    reserved CPUs) per actor; default the cluster's CPUs // actors."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False)
        elif address:
            ray.init(address=address)
        else:
            ray.init()
        started = True
    try:
        if not paths:
            return
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_actor = threads or max(1, cpus // actors)
        if per_actor * actors > cpus:
            warnings.warn(f"{actors} actors x {per_actor} threads need {per_actor * actors} CPUs but the Ray cluster "
                          f"has {cpus}: some actors will wait for CPUs", stacklevel=2)
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False  # lookfast's own bar counts the rows written
        blocks = max(1, min(len(paths), math.ceil(len(paths) / settings.batch)))
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
        ds = ds.map_batches(
            predictor_cls or Predictor,
            fn_constructor_kwargs={"settings": settings, "threads": per_actor},
            batch_size=settings.batch,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=IN_FLIGHT_BATCHES,
                                      enable_true_multi_threading=True),
            num_cpus=per_actor,
        )
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            rows = table_to_rows(table)
            writer.write(rows)
            summary.add(rows)
            bar.update(len(rows))
    finally:
        if started:
            ray.shutdown()
