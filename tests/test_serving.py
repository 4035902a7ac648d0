"""lookfast.serving.Engine: per-image equality with running the image alone (exit index identical), continuous
batching (full stage batches whatever the exit rates), concurrency, per-request failures, drain on close."""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future

import pytest
import torch

import lookfast
from lookfast.models.lookwhere import LookWhere
from lookfast.serving import Engine, Prediction

sys.path.insert(0, os.path.dirname(__file__))
from test_models_dyn_perceiver import small_model as dp_small_model  # noqa: E402

TIMEOUT = 120  # seconds any single future may take on a loaded 2-core machine
SIZE = 48      # Dyn-Perceiver test images: small, the CNN and latents work at any size
LW_SMALL = dict(dim=64, num_heads=2, selector_depth=1, extractor_depth=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while these tests run (restored after): the engine's worker and the reference runs then
    do not oversubscribe a small shared machine, where 2 threads per process ran 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _between(values: torch.Tensor, k: int) -> float:
    """A threshold passed by exactly the k largest of `values`, halfway between two of them (never equal to one:
    batched and single-image runs round differently)."""
    v = values.sort(descending=True).values
    return ((v[k - 1] + v[k]) / 2).item()


@pytest.fixture(scope="module")
def dp_setup():
    """A small-input Dyn-Perceiver (random rule-filled weights), 16 images and thresholds that send 6/4/3/3 of them
    to exits 1..4 (run alone, each image's exit is then well away from a threshold)."""
    m = dp_small_model("reg800m_perceiver_t128", seed=5, num_classes=10)
    torch.manual_seed(21)
    x = torch.randn(16, 3, SIZE, SIZE)
    with torch.no_grad():
        conf = torch.stack(m(x)).softmax(-1).amax(-1)  # (4, B)
    t0 = _between(conf[0], 6)
    rest = conf[0] < t0
    t1 = _between(conf[1][rest], 4)
    rest &= conf[1] < t1
    t2 = _between(conf[2][rest], 3)
    thresholds = [t0, t1, t2, 0.0]
    alone = [m.forward_early_exit(x[i:i + 1], thresholds) for i in range(x.shape[0])]
    logits = torch.cat([a[0] for a in alone])
    exits = torch.cat([a[1] for a in alone])
    assert torch.bincount(exits, minlength=4).tolist() == [6, 4, 3, 3]  # mixed exits, or the test means little
    return m, x, thresholds, logits, exits


def _check_dp(preds, logits, exits, rows=None):
    rows = range(len(preds)) if rows is None else rows
    for p, i in zip(preds, rows):
        assert isinstance(p, Prediction)
        assert p.exit_index == int(exits[i]), f"image {i}: exit {p.exit_index}, alone {int(exits[i])}"
        assert p.k is None and p.latency_s > 0
        scale = logits[i].abs().max().item()
        torch.testing.assert_close(p.logits, logits[i], rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_dyn_perceiver_matches_each_image_alone(dp_setup, max_batch):
    m, x, thresholds, logits, exits = dp_setup
    with Engine(m, max_batch=max_batch, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        preds = engine.run(x)  # a (B, 3, H, W) tensor iterates over its images
        stats = engine.stats()
    _check_dp(preds, logits, exits)
    assert stats["images_done"] == 16 and stats["images_failed"] == 0
    assert stats["exits"] == [6, 4, 3, 3]
    assert stats["rows_per_stage"] == [16, 10, 6, 3]
    assert max(stats["mean_batch_per_stage"]) <= max_batch


def test_dyn_perceiver_fused_ops_matches_alone(dp_setup):
    m, x, thresholds, _, _ = dp_setup
    fused = dp_small_model("reg800m_perceiver_t128", ops="fused", seed=5, num_classes=10)
    alone = [fused.forward_early_exit(x[i:i + 1], thresholds) for i in range(8)]
    with Engine(fused, max_batch=4, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        preds = engine.run(list(x[:8]))
    _check_dp(preds, torch.cat([a[0] for a in alone]), torch.cat([a[1] for a in alone]))


def test_no_thresholds_means_no_early_exit(dp_setup):
    m, x, _, _, _ = dp_setup
    with torch.no_grad():
        y4 = m(x[:5])[3]
    with Engine(m, max_batch=4, image_shape=(3, SIZE, SIZE)) as engine:
        preds = engine.run(x[:5])
        assert engine.stats()["exits"] == [0, 0, 0, 5]
    assert [p.exit_index for p in preds] == [3] * 5
    for i, p in enumerate(preds):
        torch.testing.assert_close(p.logits, y4[i], rtol=1e-4, atol=1e-4)


def test_concurrent_submitters(dp_setup):
    m, x, thresholds, logits, exits = dp_setup
    results: dict[int, Prediction] = {}
    errors: list[BaseException] = []
    with Engine(m, max_batch=6, thresholds=thresholds, image_shape=(3, SIZE, SIZE), max_wait_ms=1.0) as engine:
        def client(t):
            try:
                futures = [(i, engine.submit(x[i])) for i in range(t, 16, 8)]  # 8 threads, 2 images each
                for i, f in futures:
                    results[i] = f.result(timeout=TIMEOUT)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT)
    assert not errors and sorted(results) == list(range(16))
    _check_dp([results[i] for i in range(16)], logits, exits)


# ------------------------------------------------------------------------------- continuous batching, exactly
def _gated_model(exit_of, gate: threading.Event, calls: list):
    """A synthetic 4-exit runner: an image whose pixel [0, 0, 0] holds e leaves at exit e (its head gives logits
    (10, 0), confidence ~1; others (0, 0), confidence 0.5). Stage 0 waits for `gate` on its first call, so a test can
    queue every request before anything runs. `calls` records (stage, rows) of every stage call."""

    def stage(i):
        def run(s):
            if i == 0 and not gate.is_set():
                gate.wait(TIMEOUT)
            calls.append((i, s[0].shape[0]))
            return (s[0] + 0.0,)
        return run

    def head(i):
        def run(s):
            hit = (s[0][:, 0, 0, 0] == i).to(s[0].dtype) * 10.0
            return torch.stack([hit, torch.zeros_like(hit)], 1) + s[0][:, 1, 0, :2]
        return run

    return lookfast.EarlyExitRunner([stage(i) for i in range(4)], [head(i) for i in range(4)])


def test_stages_run_full_batches_whatever_the_exit_rates():
    # 32 images, every group of 8 consecutive: 4 leave at exit 0, 2 at exit 1, 1 at exit 2, 1 at the last.
    pattern = [0, 0, 0, 0, 1, 1, 2, 3]
    x = torch.zeros(32, 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([float(pattern[i % 8]) for i in range(32)])
    x[:, 1, 0, :2] = torch.randn(32, 2) * 0.01
    gate, calls = threading.Event(), []
    runner = _gated_model(pattern, gate, calls)
    with Engine(runner, max_batch=8, thresholds=[0.9, 0.9, 0.9, 0.0], max_wait_ms=60_000) as engine:
        futures = [engine.submit(img) for img in x]
        gate.set()
        preds = [f.result(timeout=TIMEOUT) for f in futures]
        stats = engine.stats()
    assert [p.exit_index for p in preds] == [pattern[i % 8] for i in range(32)]
    for i, p in enumerate(preds):
        expected = torch.tensor([10.0, 0.0]) + x[i, 1, 0, :2]
        torch.testing.assert_close(p.logits, expected)
    # Rows per stage 32 / 16 / 8 / 4: the fewest batches of 8 are 4 / 2 / 1 / 1, each full but the last stage's 4.
    # A static batch of 8 would run 4 batches at every stage, the later ones on 4 / 2 / 1 rows.
    assert stats["batches_per_stage"] == [4, 2, 1, 1]
    assert stats["mean_batch_per_stage"] == [8.0, 8.0, 8.0, 4.0]
    assert sorted(calls) == sorted([(0, 8)] * 4 + [(1, 8)] * 2 + [(2, 8), (3, 4)])


# ---------------------------------------------------------------------------------------------- LookWhere
@pytest.fixture(scope="module")
def lw_images():
    torch.manual_seed(3)
    return torch.randn(10, 3, 182, 182)


def _lw_model(ops: str, task: str = "cls"):
    torch.manual_seed(0)
    return LookWhere.from_config(lw_type="dinov2", high_res_size=182, k=20, num_classes=5, task=task, ops=ops,
                                 **LW_SMALL).eval()


@pytest.mark.parametrize("ops", ["fused", "reference"])
@pytest.mark.parametrize("kw", [dict(k_mass=0.05, k_min=2, k_max=100), dict(k_mass=0.3), dict(k=7), {}],
                         ids=["k_mass-clamped", "k_mass", "k", "model-k"])
def test_lookwhere_matches_each_image_alone(lw_images, ops, kw):
    m = _lw_model(ops)
    with torch.no_grad():
        alone = [m.forward_with_intermediates(lw_images[i:i + 1], **kw) for i in range(10)]
    with Engine(m, max_batch=4, **kw) as engine:
        preds = engine.run(lw_images)
        stats = engine.stats()
    ks = []
    for p, a in zip(preds, alone):
        k = a["k"]
        k = int(k[0]) if isinstance(k, torch.Tensor) else k
        ks.append(k)
        assert p.k == k and p.exit_index == 1
        torch.testing.assert_close(p.logits, a["cls_logits"][0], rtol=1e-4, atol=1e-4)
    if "k_mass" in kw:
        assert len(set(ks)) > 1, f"k_mass should give ragged k here, got {ks}"  # else the packing is not tested
    assert stats["rows_per_stage"] == [10, 10]


def test_lookwhere_token_budget_packs_ragged_k(lw_images):
    m = _lw_model("fused")
    prefix = m.extractor.num_prefix_tokens
    with Engine(m, max_batch=10, k_mass=0.3, max_tokens=3 * (prefix + 40), max_wait_ms=50) as engine:
        preds = engine.run(lw_images)
        stats = engine.stats()
    tokens = sum(p.k + prefix for p in preds)
    budget = 3 * (prefix + 40)
    assert stats["mean_units_per_stage"][1] <= budget
    assert stats["batches_per_stage"][1] >= -(-tokens // budget)  # never more tokens in one pack than the budget
    assert stats["batches_per_stage"][1] < 10                      # and several images per pack


def test_lookwhere_seg_task(lw_images):
    m = _lw_model("fused", task="seg")
    with torch.no_grad():
        alone = [m(lw_images[i:i + 1], k_mass=0.3) for i in range(3)]
    with Engine(m, max_batch=3, k_mass=0.3) as engine:
        preds = engine.run(lw_images[:3])
    for p, a in zip(preds, alone):
        assert p.logits.shape == (5, 13, 13)
        torch.testing.assert_close(p.logits, a[0], rtol=1e-4, atol=1e-4)


def test_lookwhere_refuses_options_of_other_models():
    m = _lw_model("fused")
    with pytest.raises(ValueError, match="thresholds"):
        Engine(m, thresholds=[0.5, 0.0])
    with pytest.raises(ValueError, match="either k or k_mass"):
        Engine(m, k=3, k_mass=0.5)
    with pytest.raises(ValueError, match="k must be in"):
        Engine(m, k=10_000)
    with pytest.raises(ValueError, match="k_mass"):
        Engine(m, k_mass=1.5)


# ---------------------------------------------------------------------------------------------- failures
def test_bad_requests_fail_alone(dp_setup):
    m, x, thresholds, logits, exits = dp_setup
    nan = x[0].clone()
    nan[1, 2, 3] = float("nan")
    inf = x[0].clone()
    inf[0, 0, 0] = float("inf")
    bad = {"shape": (torch.randn(3, SIZE, SIZE + 1), ValueError, "shape"),
           "channels": (torch.randn(1, SIZE, SIZE), ValueError, r"\(3, H, W\)"),
           "batched": (torch.randn(1, 3, SIZE, SIZE), ValueError, r"\(3, H, W\)"),
           "nan": (nan, ValueError, "NaN"),
           "inf": (inf, ValueError, "infinite"),
           "int": (torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), TypeError, "floating"),
           "list": ([[0.0]], TypeError, "torch.Tensor")}
    with Engine(m, max_batch=4, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        futures = []
        for i in range(8):
            futures.append(("good", i, engine.submit(x[i])))
            name = list(bad)[i % len(bad)]
            futures.append((name, None, engine.submit(bad[name][0])))
        for name, i, f in futures:
            if name == "good":
                _check_dp([f.result(timeout=TIMEOUT)], logits, exits, rows=[i])
            else:
                _, kind, message = bad[name]
                with pytest.raises(kind, match=message):
                    f.result(timeout=TIMEOUT)
        assert engine.stats()["images_failed"] == 8 and engine.stats()["images_done"] == 8


def test_a_request_that_raises_in_the_model_fails_alone():
    poison = 7.0

    def model(images):  # a one-exit model that refuses images carrying the poison value
        if (images[:, 0, 0, 0] == poison).any():
            raise RuntimeError("poisoned image")
        return images.flatten(1)[:, :4] * 2

    x = torch.randn(9, 3, 2, 2)
    x[4, 0, 0, 0] = poison
    with Engine(model, max_batch=4, max_wait_ms=50) as engine:
        futures = [engine.submit(img) for img in x]
        for i, f in enumerate(futures):
            if i == 4:
                with pytest.raises(RuntimeError, match="poisoned"):
                    f.result(timeout=TIMEOUT)
            else:
                torch.testing.assert_close(f.result(timeout=TIMEOUT).logits, x[i].flatten()[:4] * 2)
        results = engine.run(x, return_exceptions=True)
    assert isinstance(results[4], RuntimeError) and all(isinstance(r, Prediction) for j, r in enumerate(results) if j != 4)
    with pytest.raises(RuntimeError, match="poisoned"):
        Engine(model).run(x[3:5])


def test_close_drains_everything_submitted(dp_setup):
    m, x, thresholds, logits, exits = dp_setup
    # max_wait_ms is long: without the drain, the partial batches left at close would wait a minute.
    engine = Engine(m, max_batch=5, thresholds=thresholds, image_shape=(3, SIZE, SIZE), max_wait_ms=60_000)
    futures = [engine.submit(img) for img in x[:11]]
    engine.close()
    assert all(f.done() for f in futures)
    _check_dp([f.result() for f in futures], logits, exits)
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(x[0])
    engine.close()  # idempotent


def test_constructor_validation(dp_setup):
    m = dp_setup[0]
    with pytest.raises(ValueError, match="max_batch"):
        Engine(m, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Engine(m, max_wait_ms=-1)
    with pytest.raises(ValueError, match="thresholds must hold 4"):
        Engine(m, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="LookWhere"):
        Engine(m, k_mass=0.5)
    with pytest.raises(ValueError, match="thresholds need a multi-exit"):
        Engine(lambda t: t, thresholds=[0.5])
    with pytest.raises(TypeError, match="model must be"):
        Engine(42)


def test_future_is_a_concurrent_future(dp_setup):
    m, x, thresholds, _, _ = dp_setup
    with Engine(m, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        f = engine.submit(x[0])
        assert isinstance(f, Future)
        assert isinstance(f.result(timeout=TIMEOUT), Prediction)


# ------------------------------------------------------------------------------- no copy at 0 % / 100 % exits
@pytest.mark.parametrize("where", ["runner", "engine"])
def test_no_compaction_copy_when_nobody_or_everybody_exits(monkeypatch, where):
    """Exit 0: nobody passes; exit 1: everybody passes. Neither may call compact_rows (the copy), and the results
    are those of the full computation."""
    import lookfast.early_exit.runner as runner_module
    import lookfast.serving.pipelines as pipelines_module

    calls = []
    module = runner_module if where == "runner" else pipelines_module
    real = module.compact_rows
    monkeypatch.setattr(module, "compact_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    stages = [lambda s: (s[0] * 2,), lambda s: (s[0] + 1,), lambda s: (s[0] * 3,)]
    heads = [lambda s: torch.zeros(s[0].shape[0], 2),                          # confidence 0.5: nobody passes 0.9
             lambda s: torch.stack([s[0].flatten(1)[:, 0] * 0 + 20, s[0].flatten(1)[:, 0] * 0], 1),  # ~1: all pass
             lambda s: s[0].flatten(1)[:, :2]]
    runner = lookfast.EarlyExitRunner(stages, heads)
    x = torch.randn(6, 3, 2, 2)
    if where == "runner":
        logits, exit_index = runner((x,), [0.9, 0.9, 0.0])
        assert exit_index.tolist() == [1] * 6
        torch.testing.assert_close(logits, torch.tensor([[20.0, 0.0]] * 6))
    else:
        with Engine(runner, max_batch=6, thresholds=[0.9, 0.9, 0.0], max_wait_ms=60_000) as engine:
            preds = engine.run(x)
            stats = engine.stats()
        assert [p.exit_index for p in preds] == [1] * 6 and stats["rows_per_stage"] == [6, 6, 0]
        for p in preds:
            torch.testing.assert_close(p.logits, torch.tensor([20.0, 0.0]))
    assert calls == []
    # A mixed exit does copy (else the check above would pass vacuously, e.g. if compact_rows were renamed).
    x[:, 0, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    mixed = lookfast.EarlyExitRunner(
        stages, [lambda s: torch.stack([s[0][:, 0, 0, 0].relu() * 20, s[0][:, 0, 0, 0] * 0], 1)] + heads[1:])
    if where == "runner":
        _, exit_index = mixed((x,), [0.9, 0.9, 0.0])
    else:
        with Engine(mixed, max_batch=6, thresholds=[0.9, 0.9, 0.0]) as engine:
            exit_index = torch.tensor([p.exit_index for p in engine.run(x)])
    assert exit_index.tolist() == [0, 1, 0, 1, 0, 1]
    assert calls, "a mixed exit should compact the survivors"


# ------------------------------------------------------------------------------- run() of a (B, 3, H, W) tensor
def test_run_of_a_tensor_batches_views_of_it_without_a_copy():
    """A (B, 3, H, W) tensor given to run() reaches the first stage as views of its rows (no torch.cat of single
    images): every batch the model sees starts at the data pointer of one of the tensor's rows, and the batches are
    the consecutive groups of max_batch. The predictions are the model's own rows."""
    seen = []

    def model(images):
        seen.append((images.data_ptr(), images.shape[0]))
        return images.flatten(1)[:, :3] * 2

    x = torch.randn(10, 3, 2, 2)
    with Engine(model, max_batch=4, max_wait_ms=60_000) as engine:
        preds = engine.run(x)
    rows = {x[i].data_ptr(): i for i in range(10)}
    assert sorted((rows[p], n) for p, n in seen) == [(0, 4), (4, 4), (8, 2)]
    for i, p in enumerate(preds):
        torch.testing.assert_close(p.logits, x[i].flatten()[:3] * 2)
    # A list of the same images is copied into batches (each a fresh tensor), with the same results.
    seen.clear()
    with Engine(model, max_batch=4, max_wait_ms=60_000) as engine:
        again = engine.run(list(x))
    assert sorted(n for _, n in seen) == [2, 4, 4] and not any(p in rows for p, _ in seen)
    for a, b in zip(preds, again):
        torch.testing.assert_close(a.logits, b.logits)


def test_run_of_a_tensor_with_bad_rows_fails_them_alone(dp_setup):
    m, x, thresholds, logits, exits = dp_setup
    y = x.clone()
    y[2, 0, 5, 5] = float("nan")
    y[7, 2, 0, 0] = float("-inf")
    y[8, 1, 1, 1] = float("inf")
    y[8, 1, 1, 2] = float("-inf")  # inf + -inf: the row's sum is NaN, still caught
    with Engine(m, max_batch=3, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        results = engine.run(y, return_exceptions=True)
        stats = engine.stats()
        with pytest.raises(ValueError, match="NaN or infinite"):
            engine.run(y[:4])
    good = [i for i in range(16) if i not in (2, 7, 8)]
    for i in (2, 7, 8):
        assert isinstance(results[i], ValueError) and "NaN or infinite" in str(results[i])
    _check_dp([results[i] for i in good], logits, exits, rows=good)
    assert stats["images_failed"] == 3 and stats["images_done"] == 13 and stats["rows_per_stage"][0] == 13
    # A block of the wrong dtype or shape fails every image with submit's error.
    with Engine(m, max_batch=3, thresholds=thresholds, image_shape=(3, SIZE, SIZE)) as engine:
        ints = engine.run(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), return_exceptions=True)
        wide = engine.run(torch.zeros(2, 3, SIZE, SIZE + 1), return_exceptions=True)
        gray = engine.run(torch.zeros(2, 1, SIZE, SIZE), return_exceptions=True)
    assert all(isinstance(e, TypeError) and "floating" in str(e) for e in ints)
    assert all(isinstance(e, ValueError) and "shape" in str(e) for e in wide + gray)


def test_engine_computes_no_confidence_at_an_exit_nobody_can_pass(monkeypatch, dp_setup):
    import math

    import lookfast.serving.pipelines as pipelines_module

    m, x, thresholds, _, _ = dp_setup
    calls = []
    real = pipelines_module.exit_compact
    monkeypatch.setattr(pipelines_module, "exit_compact", lambda *a, **k: calls.append(1) or real(*a, **k))
    never = [math.inf, math.inf, math.inf, 0.0]
    want, want_exit = m.forward_early_exit(x[:6], never)
    with Engine(m, max_batch=4, thresholds=never, image_shape=(3, SIZE, SIZE)) as engine:
        preds = engine.run(x[:6])
    assert calls == [] and [p.exit_index for p in preds] == want_exit.tolist() == [3] * 6
    for i, p in enumerate(preds):
        torch.testing.assert_close(p.logits, want[i], rtol=1e-4, atol=1e-4)
    with Engine(m, max_batch=4, thresholds=[math.inf, 2.0, math.inf, 0.0], image_shape=(3, SIZE, SIZE)) as engine:
        engine.run(x[:6])
    assert calls  # a finite threshold is computed (the check above is not vacuous)


# ------------------------------------------------------------------------------- the optional extra stays optional
_BLOCK_EXTRAS = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'multipart', 'PIL'):
            raise ImportError(f'blocked for the test: {name}')
sys.meta_path.insert(0, _Block())
"""


def _run_python(code: str) -> "subprocess.CompletedProcess":
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_lookfast_imports_no_server_package():
    p = _run_python("import sys, lookfast, lookfast.serving, lookfast.__main__\n"
                    "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                    "('fastapi', 'uvicorn', 'starlette', 'multipart', 'PIL')))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_serve_without_the_extra_says_how_to_install_it():
    p = _run_python(_BLOCK_EXTRAS + "from lookfast.__main__ import main\n"
                    "sys.exit(main(['serve', '--model', 'dyn_perceiver:reg800m_perceiver_t128', '--random-weights']))")
    assert p.returncode == 2, p.stderr
    assert "pip install 'lookfast[serve]'" in p.stderr
