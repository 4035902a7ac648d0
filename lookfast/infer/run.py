"""The job: list the inputs, skip what the output already holds, predict the rest (here or on Ray), write the rows,
show progress, and summarise."""
from __future__ import annotations

import collections
import os
import sys
import time
from dataclasses import replace

from .outputs import RowWriter
from .predict import InferSettings, Worker
from .sources import list_images


def run_inference(settings: InferSettings, inputs, output, *, resume: bool = False, threads: int | None = None,
                  progress: bool = True, flush_rows: int = 1024, flush_seconds: float = 60.0,
                  ray_address: str | None = None, actors: int = 1, model=None, stream=None,
                  predictor_cls=None) -> dict:
    """Run `settings` over `inputs` (a folder or glob pattern) into `output` (.jsonl file or .parquet folder).

    resume: continue an existing output, skipping the paths it already holds (without it an existing output is
    refused). threads: torch intra-op threads (single process) or per Ray actor (default there: the cluster's CPUs
    divided by `actors`). ray_address: None runs in this process; otherwise on Ray Data ("local" starts a Ray on
    this machine, "auto" or "ray://host:port" / "host:port" connect; "" uses ray.init()'s own default), with
    `actors` model replicas. model: an already loaded model for the single-process run (settings.model is then only
    described). predictor_cls: the Ray callable class (default lookfast.integrations.ray.Predictor; tests inject
    failures with a subclass). Returns the summary dict (also printed to `stream`, default stderr)."""
    stream = sys.stderr if stream is None else stream
    paths, root, skipped_files = list_images(inputs)
    if settings.root is None:
        settings = replace(settings, root=root)
    if settings.mask_dir is not None:
        settings = replace(settings, mask_dir=os.path.abspath(settings.mask_dir))
        inside = settings.mask_dir + os.sep
        paths = [p for p in paths if not p.startswith(inside)]  # masks saved inside the input are not inputs
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    summary = Summary(len(paths), skipped_files)
    with RowWriter(output, resume=resume, flush_rows=flush_rows, flush_seconds=flush_seconds) as writer:
        todo = [p for p in paths if p not in writer.done]
        summary.already_done = len(paths) - len(todo)
        bar = _progress_bar(len(todo), progress)
        summary.start()
        try:
            if not todo:
                summary.exit_macs = None
            elif ray_address is None:
                summary.exit_macs = _run_local(settings, todo, writer, summary, bar, threads, model)
            else:
                from ..integrations.ray import run_on_ray

                run_on_ray(settings, todo, writer, summary, bar, ray_address, actors, threads, predictor_cls)
                summary.exit_macs = _exit_macs_of_spec(settings)
        finally:
            summary.stop()
            bar.close()
    result = summary.as_dict()
    print(summary.text(), file=stream)
    return result


# Batches submitted to the engine ahead of the one being collected: while the engine runs them, this thread
# decodes the next batch, and the engine's later stages fill up with survivors of several batches.
IN_FLIGHT_BATCHES = 2


def _run_local(settings, todo, writer, summary, bar, threads, model):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    worker = Worker(settings, model)
    pending = collections.deque()
    try:
        for start in range(0, len(todo), settings.batch):
            chunk = todo[start:start + settings.batch]
            pending.append(worker.start(chunk, worker.decode(chunk)))
            while len(pending) > IN_FLIGHT_BATCHES:
                _write(worker.finish(pending.popleft()), writer, summary, bar)
        while pending:
            _write(worker.finish(pending.popleft()), writer, summary, bar)
    finally:
        worker.close()
    return _exit_macs(worker.model)


def _write(rows, writer, summary, bar):
    writer.write(rows)
    summary.add(rows)
    bar.update(len(rows))


def _exit_macs(model):
    return model.exit_macs() if hasattr(model, "exit_macs") else None


def _exit_macs_of_spec(settings):
    """MACs per exit for the summary of a Ray run: counted on a randomly initialised copy (they do not depend on the
    weights or the dtype), so the driver never loads the checkpoint."""
    if settings.model.family != "dyn_perceiver":
        return None
    spec = replace(settings.model, checkpoint=None, random_weights=True, dtype="float32")
    return _exit_macs(spec.load())


class Summary:
    """Counts over the rows of this run: images, failures, exits taken, k, time."""

    def __init__(self, listed: int, skipped_files: int = 0):
        self.listed, self.skipped_files, self.already_done = listed, skipped_files, 0
        self.images = self.failed = 0
        self.exits: dict[int, int] = {}
        self.ks: list[int] = []
        self.exit_macs = None
        self._t0 = self._t1 = self._t_first = None
        self._first_images = 0

    def start(self):
        """Mark the start of the run (the clock of `seconds`)."""
        self._t0 = time.perf_counter()

    def stop(self):
        """Mark the end of the run."""
        self._t1 = time.perf_counter()

    def add(self, rows):
        """Count rows just written: images, failures (rows with an error), exits taken and k."""
        if self._t_first is None and rows:  # the first rows mark the end of start-up (Ray, actors, model loading)
            self._t_first, self._first_images = time.perf_counter(), len(rows)
        for row in rows:
            self.images += 1
            if row.get("error"):
                self.failed += 1
                continue
            if row.get("exit_index") is not None:
                self.exits[row["exit_index"]] = self.exits.get(row["exit_index"], 0) + 1
            if row.get("k") is not None:
                self.ks.append(row["k"])

    def _steady_rate(self):
        """Images per second after the first rows arrived (start-up excluded)."""
        if self._t_first is None or self._t1 is None or self._t1 <= self._t_first:
            return None
        return (self.images - self._first_images) / (self._t1 - self._t_first)

    def as_dict(self) -> dict:
        """The counts as the dict run_inference returns: images, failed, already_done, listed, skipped_files,
        seconds, images_per_s, steady_images_per_s (after the first rows), exits ({exit index: images}), mean_k, and
        (Dyn-Perceiver) macs_saved, mean_macs, full_macs (None where they do not apply)."""
        seconds = (self._t1 or time.perf_counter()) - (self._t0 or time.perf_counter())
        out = {"images": self.images, "failed": self.failed, "already_done": self.already_done,
               "listed": self.listed, "skipped_files": self.skipped_files, "seconds": seconds,
               "images_per_s": self.images / seconds if seconds > 0 else None,
               "steady_images_per_s": self._steady_rate(),
               "exits": dict(sorted(self.exits.items())), "mean_k": (sum(self.ks) / len(self.ks)) if self.ks else None,
               "macs_saved": None, "mean_macs": None, "full_macs": None}
        done = sum(self.exits.values())
        if self.exit_macs and done:
            full = self.exit_macs[-1]
            mean = sum(self.exit_macs[e] * n for e, n in self.exits.items()) / done
            out.update(macs_saved=1.0 - mean / full, mean_macs=mean, full_macs=full)
        return out

    def text(self) -> str:
        """The counts as the lines printed at the end of `lookfast infer`."""
        d = self.as_dict()
        rate = f"{d['images_per_s']:.1f} images/s" if d["images_per_s"] else "-"
        if d["steady_images_per_s"]:
            rate += f", {d['steady_images_per_s']:.1f} after the first rows"
        lines = [f"lookfast infer: {d['images']} images in {d['seconds']:.1f} s ({rate}); "
                 f"{d['images'] - d['failed']} predicted, {d['failed']} failed"]
        if d["already_done"]:
            lines.append(f"  {d['already_done']} of {d['listed']} listed images were already in the output (skipped)")
        if d["skipped_files"]:
            lines.append(f"  {d['skipped_files']} non-image files in the input folder left out")
        if d["exits"]:
            done = sum(d["exits"].values())
            lines.append("  exits taken: " + ", ".join(f"exit_index {e}: {n} ({100 * n / done:.0f}%)"
                                                       for e, n in d["exits"].items()))
        if d["macs_saved"] is not None:
            lines.append(f"  MACs: {d['mean_macs'] / 1e9:.3f} G per image against {d['full_macs'] / 1e9:.3f} G for "
                         f"the full model ({100 * d['macs_saved']:.1f}% saved)")
        if d["mean_k"] is not None:
            lines.append(f"  mean k: {d['mean_k']:.1f} patches per image (min {min(self.ks)}, max {max(self.ks)})")
        return "\n".join(lines)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError("the progress bar needs tqdm: pip install 'lookfast[infer]' (or pass --no-progress)") from exc
    return tqdm(total=total, unit="img", desc="lookfast infer", dynamic_ncols=True, smoothing=0.1)
