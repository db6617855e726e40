"""Ray's output goes through logging: the terminal shows the package's lines (a worker's epoch lines as if the driver
said them), Ray's own ("Reporting training result ...", checkpoints, start-up) only with -v, the run's log all."""

from __future__ import annotations

import io
import logging

import pytest


@pytest.fixture
def seen():
    """Records reaching the package's root logger (DEBUG and up) while a test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger("neuroimagen")
    keep, level = Keep(level=logging.DEBUG), root.level
    root.addHandler(keep)
    root.setLevel(logging.DEBUG)
    yield records
    root.removeHandler(keep)
    root.setLevel(level)


def _tagged(name: str, level: int, message: str) -> list[str]:
    from neuroimagen.distributed.train import _TaggedFormatter

    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    return _TaggedFormatter("%(message)s").format(record).split("\n")


def test_a_workers_lines_come_back_under_their_logger_and_rays_at_debug(seen):
    from neuroimagen.distributed.train import RAY_LOGGER, _route_batch

    ours = _tagged("neuroimagen.training.loop", logging.INFO, "[encoder] epoch 1/3 train_triplet=0.045")
    warn = _tagged("neuroimagen.stages", logging.WARNING, "first line\nsecond line")
    assert len(warn) == 2  # every line of a multi-line message is tagged
    ray_line = "Reporting training result 1: TrainingReport(checkpoint=..., metrics={'epoch': 0})"
    _route_batch({"lines": ours + [ray_line] + warn, "pid": 42, "actor_name": "RayTrainWorker", "is_err": True})
    got = [(r.name, r.levelno, r.getMessage()) for r in seen]
    assert got == [("neuroimagen.training.loop", logging.INFO, "[encoder] epoch 1/3 train_triplet=0.045"),
                   (RAY_LOGGER, logging.DEBUG, f"(RayTrainWorker pid=42) {ray_line}"),
                   ("neuroimagen.stages", logging.WARNING, "first line"),
                   ("neuroimagen.stages", logging.WARNING, "second line")]


@pytest.mark.parametrize("verbosity, shown", [(0, ["[encoder] epoch 1/3"]), (-1, []),
                                              (1, ["Reporting training result 1", "[encoder] epoch 1/3"])])
def test_the_terminal_shows_rays_lines_only_with_verbose(verbosity, shown):
    from neuroimagen.distributed.train import route_worker_line
    from neuroimagen.logs import configure_cli

    stream = io.StringIO()
    handler = configure_cli(verbosity, stream=stream)
    try:
        route_worker_line("Reporting training result 1: TrainingReport(...)", "RayTrainWorker pid=7")
        for line in _tagged("neuroimagen.training.loop", logging.INFO, "[encoder] epoch 1/3"):
            route_worker_line(line)
    finally:
        logging.getLogger("neuroimagen").removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(shown) and all(s in ln for s, ln in zip(shown, lines)), lines


def test_ray_init_s_printer_of_forwarded_lines_is_replaced_and_rays_logger_routed(seen):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from neuroimagen.distributed.train import RAY_LOGGER, _route_batch, route_ray_output

    ray_logger = logging.getLogger("ray")
    saved = list(dispatcher.handlers), list(ray_logger.handlers), ray_logger.propagate
    try:
        dispatcher.add_handler("ray_print_logs", lambda data: None)  # what ray.init(log_to_driver=True) installs
        route_ray_output()
        route_ray_output()  # idempotent
        names = [n for n, _ in dispatcher.handlers]
        assert "ray_print_logs" not in names and names.count("neuroimagen_worker_logs") == 1
        assert dict(dispatcher.handlers)["neuroimagen_worker_logs"] is _route_batch
        logging.getLogger("ray.tune").info("Wrote the latest version of all result files")
        logging.getLogger("ray").warning("something Ray warns about")
        got = [(r.name, r.levelno, r.getMessage()) for r in seen]
        assert got == [(RAY_LOGGER, logging.DEBUG, "ray.tune: Wrote the latest version of all result files"),
                       (RAY_LOGGER, logging.WARNING, "ray: something Ray warns about")]
    finally:
        dispatcher.handlers = saved[0]
        ray_logger.handlers[:] = saved[1]
        ray_logger.propagate = saved[2]
