"""`python -m lookfast infer` on one machine: rows equal to the model's own outputs, corrupt files reported per row,
JSON Lines and Parquet, resume after an interruption without duplicates, and the command line."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="lookfast infer needs the infer extra (pip install 'lookfast[infer]')")
pytest.importorskip("pyarrow", reason="lookfast infer needs the infer extra (pip install 'lookfast[infer]')")

from image_files import N_IMAGES  # noqa: E402
from infer_data import DP_SPEC, LW_SPEC, assert_same_rows, decoded, split_thresholds  # noqa: E402
from lookfast.__main__ import main as cli  # noqa: E402
from lookfast.infer import InferSettings, read_rows, run_inference  # noqa: E402
from lookfast.infer.outputs import RowWriter, arrow_schema  # noqa: E402
from lookfast.infer.predict import Worker  # noqa: E402
from lookfast.infer.sources import list_images  # noqa: E402
from lookfast.models.spec import ModelSpec  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dp():
    model = DP_SPEC.load()
    return model


@pytest.fixture(scope="module")
def dp_settings(folder, dp):
    _, good, _ = folder
    return InferSettings(DP_SPEC, thresholds=split_thresholds(dp, decoded(dp, good)), batch=8)


@pytest.fixture(scope="module")
def dp_rows(folder, dp_settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "preds.jsonl"
    summary = run_inference(dp_settings, folder[0], out, progress=False)
    return read_rows(out), summary


def _alone_top5(logits):
    p = torch.softmax(logits.double(), -1)
    v, i = p.topk(5)
    return [[int(c), float(q)] for c, q in zip(i, v)]


def test_dyn_perceiver_rows_match_the_model(folder, dp, dp_settings, dp_rows):
    root, good, corrupt = folder
    rows, summary = dp_rows
    assert [r["path"] for r in rows] == sorted(good + corrupt)  # every file once, in order; README.txt left out
    by_path = {r["path"]: r for r in rows}
    for path in corrupt:
        row = by_path[path]
        assert row["error"].startswith("ImageDecodeError: cannot decode image") and os.path.basename(path) in row["error"]
        assert row["top5"] is None and row["exit_index"] is None
    # Reference: the model's own forward_early_exit on all images at once, and on a few of them alone.
    x = decoded(dp, good)
    batch_logits, batch_exits = dp.forward_early_exit(x, dp_settings.thresholds)
    exits_seen = set()
    for i, path in enumerate(good):
        logits, exit_index = batch_logits[i], int(batch_exits[i])
        if i % 8 == 0:
            alone_logits, alone_exit = dp.forward_early_exit(x[i:i + 1], dp_settings.thresholds)
            assert int(alone_exit[0]) == exit_index
            torch.testing.assert_close(alone_logits[0], logits, rtol=1e-4, atol=1e-5)
        row = by_path[path]
        assert row["error"] is None and row["k"] is None and row["mask"] is None
        assert row["exit_index"] == exit_index, path
        expected = _alone_top5(logits)
        assert [c for c, _ in row["top5"]] == [c for c, _ in expected], path
        np.testing.assert_allclose([p for _, p in row["top5"]], [p for _, p in expected], atol=2e-5)
        exits_seen.add(row["exit_index"])
    assert exits_seen == {0, 1, 2, 3}  # the thresholds split the images over every exit
    # Summary: counts, exits and MACs saved from the model's exit MACs (computed here from the rows).
    assert summary["images"] == N_IMAGES + len(corrupt) and summary["failed"] == len(corrupt)
    exits = [by_path[p]["exit_index"] for p in good]
    assert summary["exits"] == {e: exits.count(e) for e in range(4)}
    macs = dp.exit_macs()
    expected_saved = 1 - sum(macs[e] for e in exits) / (len(exits) * macs[3])
    assert summary["macs_saved"] == pytest.approx(expected_saved, rel=1e-9)
    assert summary["macs_saved"] > 0.2


def test_dyn_perceiver_no_thresholds_is_the_full_model(folder, dp, tmp_path):
    _, good, _ = folder
    out = tmp_path / "full.jsonl"
    run_inference(InferSettings(DP_SPEC, batch=16), good[0], out, progress=False)  # a single file as input
    (row,) = read_rows(out)
    with torch.no_grad():
        y4 = dp(decoded(dp, good[:1]))[-1][0]
    assert row["exit_index"] == 3
    assert [c for c, _ in row["top5"]] == [c for c, _ in _alone_top5(y4)]


def test_lookwhere_k_mass_rows_match_the_model(folder, tmp_path):
    root, good, corrupt = folder
    settings = InferSettings(LW_SPEC, k_mass=0.3, k_min=2, batch=8)
    out = tmp_path / "lw.parquet"
    summary = run_inference(settings, root, out, progress=False)
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == N_IMAGES + len(corrupt)
    model = LW_SPEC.load()
    x = decoded(model, good)
    with torch.no_grad():
        res = model.forward_with_intermediates(x, k_mass=0.3, k_min=2)  # ragged k, packed: each image as alone
    ks = []
    for i, path in enumerate(good):
        row = rows[path]
        assert row["exit_index"] is None and row["error"] is None
        assert row["k"] == int(res["k"][i]), path
        expected = _alone_top5(res["cls_logits"][i])
        assert [c for c, _ in row["top5"]] == [c for c, _ in expected], path
        np.testing.assert_allclose([p for _, p in row["top5"]], [p for _, p in expected], atol=2e-5)
        ks.append(row["k"])
    assert len(set(ks)) > 1  # ragged: images kept different numbers of patches
    assert summary["mean_k"] == pytest.approx(sum(ks) / len(ks))


def test_lookwhere_seg_saves_masks(folder, tmp_path):
    root, good, _ = folder
    spec = replace(LW_SPEC, options={**LW_SPEC.options, "task": "seg"})
    settings = InferSettings(spec, k=5, batch=8, mask_dir=str(tmp_path / "masks"))
    run_inference(settings, os.path.join(root, "sub", "*.jpg"), tmp_path / "seg.jsonl", progress=False)
    rows = read_rows(tmp_path / "seg.jsonl")
    assert len(rows) == len([p for p in good if "/sub/" in p and p.endswith(".jpg")]) > 0
    from PIL import Image

    model = spec.load()
    for row in rows:
        assert row["top5"] is None and row["k"] == 5
        # Named after the image's path under the glob's root folder (root/sub): masks/img000.jpg.png
        assert row["mask"] == str(tmp_path / "masks" / (os.path.basename(row["path"]) + ".png"))
        mask = np.asarray(Image.open(row["mask"]))
        with torch.no_grad():
            seg = model(decoded(model, [row["path"]]), k=5)[0]
        assert mask.shape == (5, 5)  # the 70 px / 14 px patch grid
        np.testing.assert_array_equal(mask, seg.argmax(0).numpy())


def test_jsonl_and_parquet_hold_the_same_rows(folder, dp_settings, dp_rows, tmp_path):
    out = tmp_path / "preds.parquet"
    run_inference(dp_settings, folder[0], out, progress=False)
    assert os.path.isdir(out) and os.listdir(out) == ["part-00000.parquet"]
    assert_same_rows(read_rows(out), dp_rows[0])
    import pyarrow.parquet as pq  # one of the documented ways to read it (the folder is one dataset)

    table = pq.read_table(out)
    assert table.column_names == ["path", "top5", "exit_index", "k", "mask", "error"]
    assert table.num_rows == len(dp_rows[0])


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_resume_after_interruption_has_no_duplicates(folder, dp_settings, dp_rows, tmp_path, monkeypatch, ext):
    out = tmp_path / f"preds.{ext}"
    finished = []
    original = Worker.finish

    def finish_then_interrupt(self, pending):
        if len(finished) == 3:  # a Ctrl-C after three batches
            raise _Interrupt()
        rows = original(self, pending)
        finished.append(len(rows))
        return rows

    monkeypatch.setattr(Worker, "finish", finish_then_interrupt)
    with pytest.raises(_Interrupt):
        run_inference(dp_settings, folder[0], out, progress=False, flush_rows=10)
    monkeypatch.setattr(Worker, "finish", original)
    partial = read_rows(out)
    # Parquet writes the buffered rows when the writer closes on the interruption: all finished rows are kept.
    assert len(partial) == sum(finished) == 24
    with pytest.raises(FileExistsError, match="--resume"):
        run_inference(dp_settings, folder[0], out, progress=False)
    summary = run_inference(dp_settings, folder[0], out, progress=False, resume=True, flush_rows=10)
    assert summary["already_done"] == 24 and summary["images"] == len(dp_rows[0]) - 24
    assert_same_rows(read_rows(out), dp_rows[0])
    again = run_inference(dp_settings, folder[0], out, progress=False, resume=True)  # nothing left to do
    assert again["images"] == 0
    assert_same_rows(read_rows(out), dp_rows[0])


def test_resume_cuts_a_torn_last_line(folder, dp_settings, dp_rows, tmp_path):
    out = tmp_path / "preds.jsonl"
    lines = [json.dumps(r) for r in dp_rows[0][:6]]
    out.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])  # killed in the middle of a write
    run_inference(dp_settings, folder[0], out, progress=False, resume=True)
    assert_same_rows(read_rows(out), dp_rows[0])


def test_resume_after_sigkill(folder, tmp_path):
    """A real kill -9 of the command line in the middle of a run, then --resume."""
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "lookfast", "infer", "--model", "dyn_perceiver:reg400m_perceiver_t32",
           "--random-weights", "--num-classes", "10", "--input-size", "64", "--input", folder[0],
           "--output", str(out), "--batch", "2", "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_rows(out))
    assert 4 <= killed_at < N_IMAGES + 3
    assert subprocess.run(cmd + ["--resume"], env=env, capture_output=True).returncode == 0
    rows = read_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(list_images(folder[0])[0])  # each exactly once


def test_command_line(folder, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    code = cli(["infer", "--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--num-classes", "10",
                "--input-size", "64", "--input", os.path.join(folder[0], "**", "*.png"), "--output", str(out),
                "--thresholds", "0.3", "0.2", "0.1", "--batch", "8", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    assert "UNTRAINED" in err and "images in" in err and "MACs" in err and "exits taken" in err
    rows = read_rows(out)
    assert len(rows) == N_IMAGES // 2 + 1  # the odd images are PNGs, plus corrupt/text.png
    # Bad arguments: exit code 2 and a message naming the option.
    for argv, message in [
        (["--model", "dyn_perceiver:nope", "--random-weights"], "unknown Dyn-Perceiver config"),
        (["--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--k", "5"], "k / k_mass"),
        (["--model", "lookwhere", "--random-weights"], "num_classes"),
        (["--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--thresholds", "0.5"], "3 or 4"),
    ]:
        code = cli(["infer", *argv, "--input", folder[0], "--output", str(tmp_path / "x.jsonl"), "--no-progress"])
        assert code == 2 and message in capsys.readouterr().err
    code = cli(["infer", "--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--num-classes", "10",
                "--input-size", "64", "--input", folder[0], "--output", str(out), "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err  # an existing output is never overwritten


def test_inputs_and_outputs_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="no image file"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="matches no file"):
        list_images(str(tmp_path / "*.jpg"))
    with pytest.raises(ValueError, match="neither a folder"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=".jsonl, .ndjson or .parquet"):
        RowWriter(tmp_path / "out.csv")
    with pytest.raises(ValueError, match="checkpoint"):
        ModelSpec.parse("dyn_perceiver:reg400m_perceiver_t32")
    with pytest.raises(ValueError, match="is not a file"):
        ModelSpec.parse("dyn_perceiver:reg400m_perceiver_t32", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown family"):
        ModelSpec.parse("resnet:50", random_weights=True)
    with pytest.raises(ValueError, match="batch"):
        InferSettings(DP_SPEC, batch=0)
    with pytest.raises(ValueError, match="thresholds are for early-exit"):
        InferSettings(LW_SPEC, thresholds=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="mask_dir"):
        InferSettings(replace(LW_SPEC, options={**LW_SPEC.options, "task": "seg"}))


def test_checkpoint_loading_through_the_spec(tmp_path):
    model = DP_SPEC.load()
    path = tmp_path / "dp.pth"
    torch.save({"model": model.state_dict()}, path)
    spec = ModelSpec.parse("dyn_perceiver:reg400m_perceiver_t32", checkpoint=path,
                           options={"num_classes": 10, "input_size": 64})
    loaded = spec.load()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_import_lookfast_imports_no_optional_dependency():
    code = ("import sys, lookfast, lookfast.infer, lookfast.integrations.ray, lookfast.__main__; "
            "print(sorted(m for m in ('ray', 'PIL', 'pyarrow', 'pandas') if m in sys.modules))")
    # (tqdm is left out of the list: torch itself imports it.)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_lookwhere_checkpoint_loading_through_the_spec(tmp_path):
    """The authors' nested layout {"selector": {"backbone", "head"}, "extractor", "head"}; a file without "head" warns."""
    model = LW_SPEC.load()
    nested: dict = {}
    for key, value in model.state_dict().items():
        top, rest = key.split(".", 1)
        if top == "selector":
            part, rest = rest.split(".", 1)
            nested.setdefault("selector", {}).setdefault(part, {})[rest] = value
        else:
            nested.setdefault(top, {})[rest] = value
    path = tmp_path / "lw.pt"
    torch.save(nested, path)
    # num_heads: the loader infers 64-wide heads (every released model), this small test model has 32-wide ones.
    options = {"high_res_size": 70, "k": 9, "num_classes": 7, "num_heads": 2}
    loaded = ModelSpec.parse("lookwhere", checkpoint=path, options=options).load()
    x = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    # The type named in the spec must be the one the file holds (as `serve --model lookwhere:franca` checks).
    assert ModelSpec.parse("lookwhere:dinov2", checkpoint=path, options=options).load().config.lw_type == "dinov2"
    with pytest.raises(ValueError, match="holds a dinov2 LookWhere"):
        ModelSpec.parse("lookwhere:franca", checkpoint=path, options=options).load()
    del nested["head"]
    torch.save(nested, path)
    with pytest.warns(UserWarning, match="no classifier head"):
        ModelSpec.parse("lookwhere", checkpoint=path, options=options).load()


# ------------------------------------------------------------------------------------------------------- --dtype
def _official_probs(spec, paths, dtype):
    """Per exit (Dyn-Perceiver: 4; LookWhere: 1), the float64 softmax (N, C) of the official computation
    (ops="reference") of `spec`'s weights run in `dtype` on the decoded images, and that model."""
    ref = replace(spec, options={**spec.options, "ops": "reference"}, dtype=dtype)
    model = ref.load()
    x = decoded(model, paths).to(ref.torch_dtype)
    with torch.no_grad():
        y = model(x)
    return [torch.softmax(t.double(), -1) for t in (y if isinstance(y, (list, tuple)) else [y])], model


def _first_passing_exit(probs, thresholds):
    """The official early-exit rule in float64: per image, the first exit e < 3 whose max softmax >= thresholds[e]."""
    exits = torch.full((probs[0].shape[0],), len(probs) - 1, dtype=torch.int64)
    for e in reversed(range(len(probs) - 1)):
        exits[probs[e].max(-1).values >= thresholds[e]] = e
    return exits


@pytest.mark.parametrize("family", ["dyn_perceiver", "lookwhere"])
def test_bfloat16_rows_agree_with_the_float32_reference(folder, tmp_path, family):
    """--dtype bfloat16: the same columns and types as float32 (JSON Lines and Parquet), and against the float32
    official computation, probabilities within the bf16 rule of tests/test_models_bf16.py (at most 2x the error of the
    official computation run in bf16), top-1 equal on most images and wherever the float32 top-1 leads by more than
    that error, and (Dyn-Perceiver, early exit on bf16 logits) the same exit on most images."""
    root, good, corrupt = folder
    spec = DP_SPEC if family == "dyn_perceiver" else LW_SPEC
    p32, model32 = _official_probs(spec, good, "float32")
    p16, _ = _official_probs(spec, good, "bfloat16")
    tol = 2 * max(float((a - b).abs().max()) for a, b in zip(p16, p32))
    assert 0 < tol < 0.1  # bf16 rounding, not a different model
    thresholds = split_thresholds(model32, decoded(model32, good)) if family == "dyn_perceiver" else None
    ref_exit = _first_passing_exit(p32, thresholds) if thresholds else torch.zeros(len(good), dtype=torch.int64)

    rows = {}
    for dtype, out in (("float32", "f32.jsonl"), ("bfloat16", "bf16.jsonl"), ("bfloat16", "bf16.parquet")):
        run_inference(InferSettings(replace(spec, dtype=dtype), thresholds=thresholds, batch=8), root,
                      tmp_path / out, progress=False)
        rows[out] = read_rows(tmp_path / out)
    # Same columns and value types as float32, row for row (JSON Lines); the Parquet copy holds the same rows.
    assert len(rows["bf16.jsonl"]) == len(rows["f32.jsonl"]) == N_IMAGES + len(corrupt)
    for a, b in zip(rows["f32.jsonl"], rows["bf16.jsonl"]):
        assert a.keys() == b.keys() and a["path"] == b["path"] and a["error"] == b["error"]
        assert {k: type(v) for k, v in a.items() if k != "top5"} == {k: type(v) for k, v in b.items() if k != "top5"}
        if a["top5"] is not None:
            assert [[type(c), type(p)] for c, p in b["top5"]] == [[int, float]] * len(a["top5"])
    assert_same_rows(rows["bf16.parquet"], rows["bf16.jsonl"], tol=1e-6)
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "bf16.parquet").schema.equals(arrow_schema())

    by_path = {r["path"]: r for r in rows["bf16.jsonl"]}
    same_exit = same_top1 = 0
    for i, path in enumerate(good):
        row, e = by_path[path], int(ref_exit[i])
        if family == "dyn_perceiver":
            if row["exit_index"] != e:
                continue  # a confidence near its threshold: bf16 may take the neighbouring exit
            same_exit += 1
        ref = p32[e][i]
        for c, p in row["top5"]:
            assert abs(p - float(ref[c])) <= tol, (path, c, p, float(ref[c]), tol)
        top2 = ref.topk(2).values
        if row["top5"][0][0] == int(ref.argmax()):
            same_top1 += 1
        else:
            assert float(top2[0] - top2[1]) <= 2 * tol, (path, "top-1 flipped with a clear float32 lead")
    checked = same_exit if family == "dyn_perceiver" else len(good)
    assert same_top1 >= 0.8 * checked
    if family == "dyn_perceiver":
        assert same_exit >= 0.75 * len(good)
        assert {by_path[p]["exit_index"] for p in good} == {0, 1, 2, 3}


def test_low_precision_seg_masks_and_float16(folder, tmp_path):
    """--dtype bfloat16 with the seg task writes masks (argmax of float32-converted logits) that mostly agree with
    the float32 official masks; --dtype float16 runs too (rows of the same types)."""
    root, good, _ = folder
    spec = replace(LW_SPEC, options={**LW_SPEC.options, "task": "seg"}, dtype="bfloat16")
    settings = InferSettings(spec, k=5, batch=8, mask_dir=str(tmp_path / "masks"))
    run_inference(settings, os.path.join(root, "sub", "*.jpg"), tmp_path / "seg.jsonl", progress=False)
    rows = read_rows(tmp_path / "seg.jsonl")
    assert rows and all(r["error"] is None and r["k"] == 5 for r in rows)
    from PIL import Image

    ref = replace(spec, options={**spec.options, "ops": "reference"}, dtype="float32").load()
    agree = total = 0
    for row in rows:
        mask = np.asarray(Image.open(row["mask"]))
        with torch.no_grad():
            seg = ref(decoded(ref, [row["path"]]), k=5)[0]
        assert mask.shape == (5, 5)
        agree += int((mask == seg.argmax(0).numpy()).sum())
        total += mask.size
    assert agree >= 0.8 * total

    out = tmp_path / "fp16.jsonl"
    with pytest.warns(RuntimeWarning, match="float16") if _no_fast_fp16() else contextlib.nullcontext():
        _backend_warned().discard("spec-dtype-float16")
        run_inference(InferSettings(replace(DP_SPEC, dtype="float16"), batch=8), os.path.join(root, "sub", "*.jpg"),
                      out, progress=False)
    fp16_rows = read_rows(out)
    assert fp16_rows and all(r["exit_index"] == 3 and isinstance(r["top5"][0][1], float) for r in fp16_rows)


def _backend_warned():
    from lookfast import _backend

    return _backend._warned


def _no_fast_fp16():
    from lookfast.benchmarks.ceilings import matrix_features

    return not any(f in ("AMX-FP16", "AVX512-FP16") for f in matrix_features())


def test_dtype_validation_and_the_slow_precision_warning(monkeypatch):
    for bad in ("float64", "bf16", torch.float64, None):
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
            ModelSpec.parse("dyn_perceiver:reg400m_perceiver_t32", random_weights=True, dtype=bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        replace(DP_SPEC, dtype="half")
    assert replace(DP_SPEC, dtype=torch.bfloat16).dtype == "bfloat16"  # a torch.dtype is stored as its name
    assert ModelSpec.parse("dyn_perceiver:reg400m_perceiver_t32", random_weights=True).dtype == "float32"
    assert "dtype=bfloat16" in replace(DP_SPEC, dtype="bfloat16").describe()
    assert "dtype" not in DP_SPEC.describe()
    # Weights cast; LookWhere's bf16 weights packed (where torch has oneDNN bf16).
    from lookfast.models.packed_linear import packing_available

    lw = replace(LW_SPEC, dtype="bfloat16").load()
    assert {p.dtype for p in lw.parameters()} == {torch.bfloat16}
    assert lw.selector.packed_linears == packing_available()
    # One warning per process and precision, only on a CPU without the matrix engine for it.
    import lookfast.benchmarks.ceilings as ceilings

    warned = _backend_warned()
    monkeypatch.setattr(ceilings, "matrix_features", lambda: ["AVX512-BF16"])
    warned.discard("spec-dtype-float16")
    with pytest.warns(RuntimeWarning, match="no AMX-FP16 or AVX512-FP16"):
        replace(DP_SPEC, dtype="float16").load()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace(DP_SPEC, dtype="float16").load()      # once
        replace(DP_SPEC, dtype="bfloat16").load()     # this CPU (as patched) has a bf16 engine
    monkeypatch.setattr(ceilings, "matrix_features", lambda: [])
    warned.discard("spec-dtype-bfloat16")
    with pytest.warns(RuntimeWarning, match="no AMX-BF16 or AVX512-BF16"):
        replace(DP_SPEC, dtype="bfloat16").load()


def test_command_line_dtype(folder, tmp_path, capsys):
    out = tmp_path / "bf16.jsonl"
    code = cli(["infer", "--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--num-classes", "10",
                "--input-size", "64", "--input", os.path.join(folder[0], "sub"), "--output", str(out),
                "--dtype", "bfloat16", "--batch", "8", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "dtype=bfloat16" in err
    assert len(read_rows(out)) == len([p for p in folder[1] if "/sub/" in p])
    with pytest.raises(SystemExit) as exc:  # argparse refuses other values, naming the flag
        cli(["infer", "--model", "dyn_perceiver:reg400m_perceiver_t32", "--random-weights", "--input", folder[0],
             "--output", str(tmp_path / "x.jsonl"), "--dtype", "float64"])
    assert exc.value.code == 2 and "--dtype" in capsys.readouterr().err
