"""Batch inference over image folders: `python -m lookfast infer` (cli.py) and its Python API.

    from lookfast.infer import InferSettings, run_inference, read_rows
    from lookfast.models.spec import ModelSpec
    spec = ModelSpec.parse("dyn_perceiver:reg800m_perceiver_t128", checkpoint="reg800m.pth")
    summary = run_inference(InferSettings(spec, thresholds=(0.8, 0.7, 0.6)), "val/", "preds.parquet")
    rows = read_rows("preds.parquet")

sources.py lists the images, predict.py turns paths into rows (the one model call), outputs.py writes and reads
rows (JSON Lines or Parquet), run.py runs the job here or on Ray (lookfast.integrations.ray). Pillow, pyarrow and
tqdm are imported only when used (`pip install 'lookfast[infer]'`).
"""
from .outputs import read_rows
from .predict import InferSettings, Worker
from .run import run_inference

__all__ = ["InferSettings", "Worker", "run_inference", "read_rows"]
