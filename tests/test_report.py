"""slimtorch report: the Pareto front and latency choice (hand examples), the report of real
ResNet-20 artifacts (every number on the page is the one in the run's files), the Markdown twin,
bad input, atomic writes, and the page in a real headless Chromium (no console message, no
fetch, every figure decoded and painted)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import slimtorch
from slimtorch.errors import ArtifactError, ReportError, SlimtorchError
from slimtorch.eval.machine import torch_threads
from slimtorch.eval.report import report
from slimtorch.eval.report_data import Run, latency, pareto_front, pareto_sets
from slimtorch.eval.report_sections import summary
from slimtorch.zoo.registry import weights_path

from conftest import make_cnn

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium: apt-get install chromium (scripts/setup.sh "
    "does it when run as root)")


# ---------------------------------------------------------------- pure functions
def test_pareto_front_hand_example():
    pts = [(0.10, 80.0),          # 0 front: smallest but one
           (0.20, 90.0),          # 1 front
           (0.20, 85.0),          # 2 same size as 1, worse
           (0.30, 90.0),          # 3 same accuracy as 1, larger
           (0.50, 95.0),          # 4 front
           (0.05, 70.0),          # 5 front: the smallest
           (0.50, 95.0),          # 6 equal to 4: neither dominates, both stay
           (float("nan"), 99.0),  # 7 unmeasured: never on the front
           (0.40, 94.0)]          # 8 front: between 1 and 4
    assert pareto_front(pts) == [5, 0, 1, 8, 4, 6]
    # lower is better on both axes (size, perplexity): 1 (0.2, 90) beats 3 (0.3, 90)...
    assert pareto_front(pts, minimize=(True, True)) == [5]
    assert pareto_front([]) == [] and pareto_front([(1.0, 2.0)]) == [0]


def _run(name, model="zoo:m", metrics=None, speed=None):
    return Run(Path(name), {"meta": {"recipe": {"name": name}}}, metrics, speed, label=name)


def test_latency_prefers_smallest_batch_and_onnxruntime_and_decode_is_ms_per_token():
    rows = [{"engine": e, "batch": b, "ms": ms} for e, b, ms in [
        ("fp32 PyTorch", 1, 2.0), ("int8 PyTorch", 1, 1.5), ("fp32 onnxruntime", 1, 0.3),
        ("int8 onnxruntime", 1, 0.2), ("fp32 onnxruntime", 64, 9.0),
        ("int8 onnxruntime", 64, 4.0)]]
    lat = latency(_run("a", speed={"kind": "latency", "threads": 2, "rows": rows}))
    assert (lat.fp, lat.q, lat.unit) == (0.3, 0.2, "ms") and "batch 1, onnxruntime" in lat.label
    torch_only = [r for r in rows if "PyTorch" in r["engine"]]
    assert latency(_run("b", speed={"rows": torch_only})).q == 1.5
    dec = latency(_run("c", speed={"kind": "decode", "threads": 2, "speed": {
        "fp32": {"decode_tok_s": 20.0}, "lowered": {"decode_tok_s": 40.0}}}))
    assert (dec.fp, dec.q, dec.unit) == (50.0, 25.0, "ms/token")
    assert latency(_run("d")) is None


def test_pareto_sets_group_by_model_and_leave_out_unmeasured_runs():
    def m(size, top1):
        return {"fp_size_bytes": 4_000_000, "q_size_bytes": size, "fp_top1": 93.0,
                "q_top1": top1}
    runs = [_run("a", metrics=m(1_000_000, 92.0)), _run("b", metrics=m(500_000, 92.5)),
            _run("c", metrics=m(250_000, 80.0)), _run("d"),  # d: saved from Python
            Run(Path("e"), {"source": "zoo:other", "meta": {}}, m(1, 1.0), label="e")]
    (s,) = pareto_sets(runs, "size")  # zoo:other has one run: no front to draw
    assert [p.run.label for p in s.points] == ["a", "b", "c"]
    assert [p.on_front for p in s.points] == [False, True, True]  # b is smaller and better
    assert s.float_point == (4.0, 93.0) and s.x_label == "size (MB)"
    assert pareto_sets(runs, "latency") == []  # no run has speed.json
    lm = [Run(Path(n), {"source": "zoo:lm", "meta": {}}, {"fp_size_bytes": 9, "q_size_bytes": b,
              "fp_ppl": 46.0, "q_ppl": ppl}, label=n) for n, b, ppl in
          (("g", 4, 51.0), ("h", 4, 68.0), ("i", 3, 66.0))]
    (s,) = pareto_sets(lm, "size")  # perplexity: lower is better, so h (same size, 68) is off
    assert [p.on_front for p in s.points] == [True, False, True]


# ---------------------------------------------------------------- real artifacts
def _fmnist_subset(root: Path, n_train: int = 512, n_test: int = 1000) -> Path:
    """The first images of the real Fashion-MNIST splits as IDX files: the pipeline, unchanged,
    then calibrates on the train subset and scores on ``n_test`` test images (a tenth of the
    cost of the full test set)."""
    from slimtorch.data.fashion_mnist import load_fashion_mnist
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = load_fashion_mnist(split)
        for name, magic, a in (("images-idx3", 2051, images[:n]), ("labels-idx1", 2049,
                                                                   labels[:n].to(torch.uint8))):
            dims = b"".join(d.to_bytes(4, "big") for d in a.shape)
            (root / f"{prefix}-{name}-ubyte").write_bytes(
                magic.to_bytes(4, "big") + dims + a.numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real ResNet-20 runs as `slimtorch quantize` writes them (W8A8 and W4A4, calibration
    64, scored on 1000 real test images), `bench speed` on the first; a pruned and a sparse
    ResNet-20 (macs-0.5-taylor, 50-sparsegpt); and a custom CNN saved from Python (no
    metrics.json)."""
    if not weights_path("resnet20").is_file():
        pytest.skip("zoo weights not trained")
    from slimtorch.cli import main
    from slimtorch.pipeline import run_quantize
    root = tmp_path_factory.mktemp("runs")
    try:
        data = _fmnist_subset(tmp_path_factory.mktemp("fmnist"))
    except SlimtorchError as e:  # Fashion-MNIST not installed
        pytest.skip(str(e))
    cache = {}
    with torch_threads(1):  # 2 threads on a shared, loaded machine are many times slower
        for recipe in ("w8a8", "w4a4", "macs-0.5-taylor", "50-sparsegpt"):
            run_quantize("zoo:resnet20", recipe, calib_size=64, out=root / f"r20-{recipe}",
                         fp_cache=cache, data_dir=str(data))
        assert main(["bench", "speed", str(root / "r20-w8a8"), "--batches", "1", "--repeats",
                     "3", "--threads", "1", "--data-dir", str(data)]) == 0
        images = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0))
        slimtorch.save(slimtorch.quantize(make_cnn(), "w8a8", images), root / "custom")
    return root


def _md(path):
    return path.with_suffix(".md").read_text()


def test_report_numbers_are_the_runs_numbers(runs, tmp_path):
    dirs = [runs / "r20-w8a8", runs / "r20-w4a4"]
    html_path, md_path = report(dirs, tmp_path / "r.html")
    assert md_path == tmp_path / "r.md" and html_path.is_file()
    md, page = md_path.read_text(), html_path.read_text()
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        cfg = json.loads((d / "slimtorch.json").read_text())
        row = next(l for l in md.splitlines() if l.startswith(f"| {d.name} |"))
        assert f"{m['fp_top1']:.2f} → {m['q_top1']:.2f}" in row
        assert f"{m['fp_size_bytes'] / 1e6:.3f} MB → {m['q_size_bytes'] / 1e6:.3f} MB" in row
        assert f"{m['self_check']['output_sqnr_db']:.1f} dB" in row
        for layer in m["self_check"]["worst_layers"]:  # the SQNR figure's table
            assert f"| {layer['name']} | {layer['type']} | {layer['own_sqnr_db']:.1f} |" in md
        for fqn, e in cfg["meta"]["plan"]["layers"].items():  # bits: every planned layer
            assert f"| {fqn} | {e['weights']['bits']} | {e['activations']['bits']} |" in md
    speed = json.loads((runs / "r20-w8a8" / "speed.json").read_text())
    ms = {r["engine"]: r["ms"] for r in speed["rows"]}
    w8 = next(l for l in md.splitlines() if l.startswith("| r20-w8a8 |"))
    w4 = next(l for l in md.splitlines() if l.startswith("| r20-w4a4 |"))
    assert f"{ms['fp32 onnxruntime']:.2f} → {ms['int8 onnxruntime']:.2f} ms" in w8
    assert "| not measured |" in w4  # no speed.json: no latency invented
    # the size front: which runs are on it is pareto_front's answer on the recorded numbers
    pts = [(json.loads((d / "metrics.json").read_text())[k] for k in ("q_size_bytes", "q_top1"))
           for d in dirs]
    front = pareto_front([(s / 1e6, t) for s, t in pts])
    for i, d in enumerate(dirs):
        on = "yes" if i in front else "no"
        assert re.search(rf"^\| {d.name} \| .* \| {on} \|$", md, re.M)
    assert "accuracy vs latency" not in md  # one timed run: no latency front to draw
    # one <img> per figure, each a data: URI; nothing the browser would fetch, no script
    n_fig = md.count("*Figure (in the HTML page)")
    assert n_fig == 1 + 2 + 2 and len(re.findall(r"<img ", page)) == n_fig
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == n_fig
    assert not re.search(r"(src|href)=\"(?!data:|#)", page) and "<script" not in page


def test_pruning_and_sparsity_sections_are_the_saved_model(runs, tmp_path):
    """Kept channels per layer are the output channels of the pruned model's saved weights
    (float: the zoo model's); sparsity per layer is the fraction of zeros of the saved weights;
    runs that neither pruned nor sparsified get neither section."""
    from slimtorch.zoo.sources import load_model
    dirs = [runs / "r20-macs-0.5-taylor", runs / "r20-50-sparsegpt", runs / "r20-w8a8"]
    _, md_path = report(dirs, tmp_path / "p.html")
    md = md_path.read_text()
    fp = {n: m.weight.shape[0] for n, m in load_model("zoo:resnet20").named_modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    pruned = {n: m.weight for n, m in slimtorch.load(dirs[0]).named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    smaller = 0
    for fqn, w in pruned.items():
        kept = w.shape[0]
        assert f"| {fqn} | {fp[fqn]} | {kept} | {100 * kept / fp[fqn]:.0f} |" in md
        smaller += kept < fp[fqn]
    assert smaller >= 10  # a real pruning: most layers lost channels
    total = (sum(fp.values()), sum(w.shape[0] for w in pruned.values()))
    assert f"r20-macs-0.5-taylor: {total[1]} of {total[0]} output channels kept" in md
    sparse = {n: m.weight for n, m in slimtorch.load(dirs[1]).named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    sec = md[md.index("## Sparsity per layer"):]
    for fqn, w in sparse.items():
        zeros = (w == 0).float().mean().item()
        row = re.search(rf"^\| {re.escape(fqn)} \| ([^|]+) \|", sec, re.M)
        assert row, fqn
        shown = 0.0 if "dense" in row.group(1) else float(row.group(1))
        assert abs(shown - 100 * zeros) < 0.1, (fqn, shown, zeros)
    assert "| stem.0 | 0 (dense) | first layer" in sec
    assert md.count("r20-w8a8: channels per layer") == 0 and "r20-w8a8: sparsity" not in md
    # a pruned-only run has no quantization noise: its SQNR cell says so, not "∞ dB"
    row = next(l for l in md.splitlines() if l.startswith("| r20-macs-0.5-taylor |"))
    assert "pruned only" in row and "∞" not in row


def test_run_saved_from_python_reads_not_measured_and_inspect_fills_every_layer(runs, tmp_path):
    _, md_path = report([runs / "custom"], tmp_path / "c.html")
    row = next(l for l in md_path.read_text().splitlines() if l.startswith("| custom |"))
    assert row.count("not measured") == 3  # task metric, size (file size shown), latency
    assert "No metrics.json in custom" in md_path.read_text()
    with torch_threads(1):
        _, md_path = report([runs / "r20-w8a8"], tmp_path / "i.html", inspect_samples=8)
    md = md_path.read_text()
    plan = json.loads((runs / "r20-w8a8" / "slimtorch.json").read_text())["meta"]["plan"]
    assert "recomputed by `slimtorch report --inspect-samples 8`" in md
    for fqn in plan["layers"]:  # every layer now, not only the self-check's worst 8
        assert re.search(rf"^\| {re.escape(fqn)} \| Quant\w+ \| -?[\d.]+ \|", md, re.M)


def test_bad_input_names_the_fix_and_never_leaves_a_half_written_file(runs, tmp_path):
    with pytest.raises(ReportError, match="slimtorch quantize --out DIR"):
        report([], tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="is not a slimtorch artifact"):
        report([tmp_path / "empty"], tmp_path / "r.html")
    with pytest.raises(ReportError, match="ending in .html"):
        report([runs / "custom"], tmp_path / "r.md")
    with pytest.raises(ReportError, match="≥ 0"):
        report([runs / "custom"], tmp_path / "r.html", inspect_samples=-1)
    good = report([runs / "custom"], tmp_path / "r.html")
    before = [p.read_bytes() for p in good]

    def boom(_runs):
        raise RuntimeError("a section failed mid-way")
    with pytest.raises(RuntimeError):
        report([runs / "r20-w8a8"], tmp_path / "r.html", sections=[summary, boom])
    assert [p.read_bytes() for p in good] == before  # the old report is still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "r.html", "r.md"]


def test_cli_report(runs, tmp_path, capsys):
    from slimtorch.cli import main
    out = tmp_path / "sub" / "page.html"
    assert main(["report", str(runs / "r20-w8a8"), "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "sub" / "page.md").is_file()
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- in a real browser
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0));
  const fetched = performance.getEntriesByType("resource").length;
  document.body.setAttribute("data-probe",
    `images=${imgs.length} broken=${bad.length} fetched=${fetched}`);
});
</script>"""


def _chromium(*args, timeout=60):
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox",
                           "--hide-scrollbars", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=timeout)


def _probe(page: Path) -> dict[str, int]:
    """Load a copy of ``page`` with a small script added that records, after the load event,
    how many images there are, how many failed to decode and how many resources were fetched."""
    probe = page.with_name("probe-" + page.name)
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-probe="([^"]*)"', out.stdout)
    assert found, out.stderr[-2000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}


@needs_chromium
def test_page_renders_in_headless_chromium(runs, tmp_path):
    html_path, md_path = report([runs / "r20-w8a8", runs / "r20-w4a4"], tmp_path / "r.html")
    n_fig = md_path.read_text().count("*Figure (in the HTML page)")
    # the page as written: loads with no console message at all (errors, failed loads)
    shot = tmp_path / "shot.png"
    out = _chromium("--window-size=1280,6000", f"--screenshot={shot}", html_path.as_uri())
    console = [l for l in out.stderr.splitlines() if ":CONSOLE" in l]
    assert shot.is_file() and console == [], console
    assert _probe(html_path) == {"images": n_fig, "broken": 0, "fetched": 0}
    # the probe does see a broken image (so "broken=0" above means something)
    bad = tmp_path / "bad.html"
    bad.write_text(html_path.read_text().replace(
        "</body>", '<img src="data:image/png;base64,AAAA" alt="x"></body>'))
    assert _probe(bad)["broken"] == 1
    # painted: the screenshot holds matplotlib's blue (bars, front) over many pixels
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    blue = sum(n for n, (r, g, b) in img.getcolors(1 << 24)
               if abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12)
    assert blue > 5000, blue
