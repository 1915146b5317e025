"""What a person sees: the console of a real run on a terminal, and how the run shows in MLflow.

The CLI runs in its own process with stderr on a pseudo-terminal (so it draws bars) and stdout on a
pipe; the tracking store is a real MLflow server."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import TAG_RUN_ID, TAG_STAGE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal on stderr received)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt-", dir="/tmp"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # the tests' own quieting must not help
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    received = bytearray()

    def drain():  # a pty's buffer is small: read it while the run writes, or the run blocks
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out = proc.stdout.read()
    proc.wait(timeout=300)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, received.decode(errors="replace")


def test_a_terminal_sees_one_line_per_stage_a_training_bar_and_the_run_link(mlflow_server, tmp_path):
    run_id = "console-tty"
    code, out, terminal = _run_on_a_terminal(
        ["run", "--recipe", "digits", "--run-id", run_id, "--set", f"storage={tmp_path}", "--set", f"tracking.uri={mlflow_server}",
         "--set", "tracking.experiment=console", "--set", "train.epochs=3"])
    assert code == 0, out + terminal

    # stdout: bnflow's lines only -- one per stage and per epoch, no "running" lines (the bar says that), the summary.
    lines = [line for line in out.splitlines() if line.strip()]
    stage_lines = [line for line in lines if re.match(r"\[bnflow\] stage \d/5 ", line)]
    assert [re.match(r"\[bnflow\] stage \d/5 (\w+): done in", line).group(1) for line in stage_lines] == \
        ["ingest", "normalize", "train", "recalibrate", "evaluate"]
    assert all(line.startswith(("[bnflow]", "  ")) for line in lines), lines
    # One line per finished epoch on a terminal too: the bar goes when training ends, and these stay
    # in the scrollback (issue 21: a terminal kept no record of the epochs).
    assert [re.match(r"\[bnflow\] train epoch (\d)/3 ", line).group(1) for line in lines if "train epoch" in line] == \
        ["1", "2", "3"]

    # The terminal (stderr): tqdm frames of the training bar up to its last step, and nothing else --
    # no Ray or MLflow log lines, no warnings.
    frames = [f for f in re.split(r"[\r\n]", terminal) if f.strip() and not set(f.strip()) <= set("\x1b[A")]
    assert any(re.search(r"train epoch 3/3: 100%\|.*\| 60/60 .*train_loss=", f) for f in frames), frames[-5:]
    for stage in ("normalize", "recalibrate", "evaluate"):  # bars in rows for the stages that read data
        assert any(f"[bnflow] {stage}:" in f and "rows" in f for f in frames), stage
    noise = [f for f in frames if not re.search(r"\[bnflow\] (train|normalize|recalibrate|evaluate)", f)]
    assert noise == [] or all(re.fullmatch(r"(\x1b\[A|\s)*", f) for f in noise), noise[:5]

    # The summary links the parent run's page on the server, and that page's run is this run.
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("console")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}'")
    parent = next(r for r in runs if r.data.tags[TAG_STAGE] == "pipeline")
    assert f"see it at: {mlflow_server}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}" in out

    # MLflow's standard tags on every run, and the experiment opens in the model-training view.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for r in runs:
        tags = r.data.tags
        assert tags["mlflow.source.name"] == "python -m pipeline run" and tags["mlflow.user"]
        assert tags["mlflow.source.type"] == "LOCAL"
        if head:  # a git checkout (CI's is): the commit the code came from
            assert tags["mlflow.source.git.commit"] == head
    assert len(runs) == 6


def _browser():
    """Headless Chromium from Debian's package, driven by Playwright (its own browser download cannot
    work here). `make test` installs both; a missing one is a set-up error, not a skip."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    return sync_playwright(), chromium


def test_the_run_reads_in_the_mlflow_ui(mlflow_server, tmp_path):
    """What the summary's link opens, in a real browser: the parent run in MLflow's model-training
    view, its five stage runs, a per-epoch chart and the confusion matrix. Screenshots are kept."""
    run_id = "console-tty"
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("console")
    runs = {r.data.tags[TAG_STAGE]: r.info.run_id
            for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}'")}
    assert len(runs) == 6, "runs after test_a_terminal_sees_..., which makes this run"
    shots = Path(os.environ.get("BNFLOW_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "mlflow-ui"
    shots.mkdir(parents=True, exist_ok=True)
    from pipeline.tracking.uri import ui_command

    playwright, chromium = _browser()
    with playwright as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})

        def visit(url, name, *texts):
            page.goto(url)
            for text in texts:
                page.get_by_text(text, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shots / f"{name}.png"))
            return page.inner_text("body")

        # The link bnflow prints: the parent run, in the model-training view ("Runs", not GenAI's "Evaluations").
        body = visit(ui_command(mlflow_server, exp.experiment_id, runs["pipeline"]), "1-parent-run",
                     run_id, "test_accuracy_after_recal")
        assert "Model training" in body and "Evaluations" not in body

        # The experiment's runs, the parent expanded: its five stage runs beneath it.
        visit(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning", "2-runs", run_id)
        row = page.locator("[role=row]").filter(has_text=run_id).first
        row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the parent's expander
        for stage in ("ingest", "normalize", "train", "recalibrate", "evaluate"):
            page.get_by_text(stage, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "2-runs-expanded.png"))

        # Per-epoch charts of the train run.
        page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{runs['train']}/model-metrics?workflowType=machine_learning")
        # Drawn, not just laid out: one plotted line per metric chart (plotly's traces), over epoch steps.
        page.wait_for_function("() => document.querySelectorAll('.scatterlayer .trace').length >= 6", timeout=60_000)
        # The gradient-norm sections come first (MLflow puts prefixed sections above its own); the
        # loss chart is one search away, as a user finds it.
        page.get_by_placeholder("Search metric charts").fill("loss")
        page.get_by_text("train (train_loss)").first.wait_for(timeout=30_000)
        page.get_by_text("train (val_loss)").first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "3-train-charts.png"))

        # The confusion matrix, previewed from the evaluate run's artifacts.
        visit(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{runs['evaluate']}/artifacts?workflowType=machine_learning",
              "4-evaluate-artifacts", "confusion_matrix.png")
        page.get_by_text("confusion_matrix.png", exact=True).first.click()
        # The preview is the artifact itself (a blob URL): the same pixel width as the file MLflow holds.
        import matplotlib.image

        local = client.download_artifacts(runs["evaluate"], "confusion_matrix.png", str(tmp_path))
        width = matplotlib.image.imread(local).shape[1]
        page.wait_for_function(f"() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete "
                               f"&& i.naturalWidth === {width})", timeout=30_000)
        page.screenshot(path=str(shots / "5-confusion-matrix.png"))
        browser.close()
