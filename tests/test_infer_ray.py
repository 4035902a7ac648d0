"""`python -m lookfast infer --ray local --actors 2`: the same rows as the single-process run, an actor killed in the
middle of the run retried by Ray with every image written exactly once, and --resume. One Ray session for the whole
module (Ray starts slowly on 2 cores)."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("PIL", reason="lookfast infer needs the infer extra (pip install 'lookfast[infer]')")
pytest.importorskip("pyarrow", reason="lookfast infer needs the infer extra (pip install 'lookfast[infer]')")
ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra (pip install 'lookfast[ray]')")

from image_files import N_IMAGES  # noqa: E402
from infer_data import DP_SPEC, LW_SPEC, assert_same_rows, decoded, split_thresholds  # noqa: E402
from lookfast.infer import InferSettings, read_rows, run_inference  # noqa: E402
from lookfast.integrations.ray import Predictor  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    # Workers import lookfast (and nothing from tests/): a source checkout reaches them through PYTHONPATH.
    path = os.pathsep.join(p for p in [REPO, os.environ.get("PYTHONPATH", "")] if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dp_settings(folder):
    model = DP_SPEC.load()
    return InferSettings(DP_SPEC, thresholds=split_thresholds(model, decoded(model, folder[1])), batch=8)


def _crash_once(marker: str):
    """A Predictor whose process dies (os._exit, no cleanup: as a killed or OOM-killed worker) on its second call,
    the first time any actor gets there: Ray must restart the actor and retry the task."""

    class CrashOncePredictor(Predictor):
        calls = 0

        def __call__(self, batch):
            type(self).calls += 1
            if type(self).calls == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os._exit(1)
            return super().__call__(batch)

    return CrashOncePredictor


def test_ray_two_actors_same_rows_as_single_process_and_survives_a_killed_actor(folder, dp_settings, tmp_path):
    root, good, corrupt = folder
    single = tmp_path / "single.jsonl"
    run_inference(dp_settings, root, single, progress=False)
    expected = read_rows(single)
    assert len(expected) == N_IMAGES + len(corrupt)

    out = tmp_path / "ray.parquet"
    marker = tmp_path / "crashed"
    summary = run_inference(dp_settings, root, out, progress=False, ray_address="local", actors=2,
                            predictor_cls=_crash_once(str(marker)))
    assert marker.exists(), "no actor crashed: the test did not exercise the retry"
    rows = read_rows(out)
    assert_same_rows(rows, expected)  # every image exactly once, the same predictions
    assert summary["images"] == len(expected) and summary["failed"] == len(corrupt)
    assert sum(summary["exits"].values()) == N_IMAGES and summary["macs_saved"] > 0


def test_ray_lookwhere_k_mass_and_resume(folder, tmp_path):
    root, good, corrupt = folder
    settings = InferSettings(LW_SPEC, k_mass=0.3, k_min=2, batch=8)
    single = tmp_path / "single.parquet"
    run_inference(settings, root, single, progress=False)
    expected = read_rows(single)

    # An interrupted earlier run left the first 20 rows: the Ray run must add the others, once each.
    out = tmp_path / "ray.jsonl"
    with open(out, "w") as f:
        import json

        for row in read_rows(single)[:20]:
            f.write(json.dumps(row) + "\n")
    summary = run_inference(settings, root, out, progress=False, ray_address="local", actors=2, resume=True)
    assert summary["already_done"] == 20 and summary["images"] == len(expected) - 20
    assert_same_rows(read_rows(out), expected)
    assert len({r["k"] for r in expected if r["k"] is not None}) > 1


def test_ray_bfloat16_actors_run_the_spec_dtype(folder, tmp_path):
    """--dtype travels to the actors with the ModelSpec: a bf16 Ray run writes the rows of the single-process bf16
    run (same classes and exits; probabilities to bf16 batch-composition noise; not the float32 rows), and the
    summary's MACs are counted."""
    from dataclasses import replace

    root, good, corrupt = folder
    settings = InferSettings(replace(DP_SPEC, dtype="bfloat16"), batch=8)
    inputs = os.path.join(root, "sub", "*.jpg")
    single = tmp_path / "single.jsonl"
    run_inference(settings, inputs, single, progress=False)
    out = tmp_path / "ray.jsonl"
    summary = run_inference(settings, inputs, out, progress=False, ray_address="local", actors=2)
    rows = read_rows(out)
    assert len(rows) == len([p for p in good if "/sub/" in p]) and summary["full_macs"] > 0
    assert all(isinstance(r["top5"][0][1], float) and r["exit_index"] == 3 for r in rows)
    assert_same_rows(rows, read_rows(single), tol=1e-3)
    # ... and not float32 rows: the float32 run differs from the bf16 ones by bf16 rounding (~1e-2 here, >> 1e-3).
    f32 = tmp_path / "f32.jsonl"
    run_inference(InferSettings(DP_SPEC, batch=8), inputs, f32, progress=False)
    by_path = {r["path"]: r for r in read_rows(f32)}
    assert max(abs(p - q) for r in rows for (_, p), (_, q) in zip(r["top5"], by_path[r["path"]]["top5"])) > 2e-3
