"""The DAG declaration is validated before anything runs."""

import pytest

from pipeline.dag import PIPELINE, DagError, Node, validate


def _a(cfg, out_dir, seed):
    return 1


def _b(cfg, out_dir, x):
    return 2


def _c(cfg, out_dir, y):
    return 3


def test_shipped_pipeline_is_valid_and_ordered():
    order = [n.name for n in validate(PIPELINE)]
    assert order == ["ingest", "normalize", "train", "recalibrate", "evaluate"]


def test_cycle_is_reported_with_its_path():
    nodes = (Node("b", _b, "data", {"x": "y_out"}, {"x_out": int}), Node("c", _c, "data", {"y": "x_out"}, {"y_out": int}))
    with pytest.raises(DagError, match="cycle: .*b.*c"):
        validate(nodes)


def test_missing_input_suggests_the_close_name():
    nodes = (Node("a", _a, "data", {"seed": "seed"}, {"raw": int}), Node("b", _b, "data", {"x": "rawx"}, {"out": int}))
    with pytest.raises(DagError, match="no stage produces; did you mean 'raw'"):
        validate(nodes)


def test_two_producers_of_one_artifact():
    nodes = (Node("a", _a, "data", {"seed": "seed"}, {"raw": int}), Node("a2", _a, "data", {"seed": "seed"}, {"raw": int}))
    with pytest.raises(DagError, match="two producers"):
        validate(nodes)


def test_duplicate_stage_names():
    nodes = (Node("a", _a, "data", {"seed": "seed"}, {"r1": int}), Node("a", _a, "data", {"seed": "seed"}, {"r2": int}))
    with pytest.raises(DagError, match="duplicate stage names"):
        validate(nodes)


def test_inputs_must_bind_to_the_signature():
    unknown = (Node("a", _a, "data", {"seed": "seed", "nope": "seed"}, {"r": int}),)
    with pytest.raises(DagError, match="no parameter"):
        validate(unknown)
    unbound = (Node("a", _a, "data", {}, {"r": int}),)
    with pytest.raises(DagError, match=r"\['seed'\] are not bound"):
        validate(unbound)


def test_unknown_config_section_is_a_wiring_error():
    nodes = (Node("a", _a, "trian", {"seed": "seed"}, {"r": int}),)
    with pytest.raises(DagError, match="config section 'trian'.*did you mean 'train'"):
        validate(nodes)


def test_unknown_sink_is_a_wiring_error():
    def f(cfg, out_dir, seed, log):
        return 1
    nodes = (Node("a", f, "data", {"seed": "seed"}, {"r": int}, sinks={"log": "epoch_loger"}),)
    with pytest.raises(DagError, match="sink 'log' wants 'epoch_loger'.*did you mean 'epoch_logger'"):
        validate(nodes)


def test_every_stage_that_reports_gets_the_runners_console():
    """Stages never print (issue 21): a stage that reports progress takes a ``console`` parameter,
    and the DAG binds it to the runner's console, so nothing a stage shows bypasses the runner."""
    import inspect

    from tasks.console import QUIET

    for node in PIPELINE:
        params = inspect.signature(node.fn).parameters
        if "console" in params:
            assert node.sinks.get("console") == "console", node.name
            assert params["console"].default is QUIET, node.name  # called on its own: silent


def test_a_quiet_console_shows_nothing(capsys):
    from tasks.console import QUIET

    QUIET.say("hello")
    with QUIET.progress("x", total=3) as bar:
        bar.update(3)
    assert capsys.readouterr() == ("", "")
