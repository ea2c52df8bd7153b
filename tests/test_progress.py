"""ProgressLogger: tokens from the step's global count, bad-record totals, and a log that equals
the uninterrupted run's after a resume (stale entries dropped, a cut interval continued)."""

import json

import numpy as np
from etils import epath
from ml_collections import ConfigDict

from earthgptx_jax import progress as progress_lib

TASKS = ("vqa", "image_caption")


def _config(steps=12):
  return ConfigDict({"train": {"steps": steps}, "loss": {"ce": 1.0, "mask_bce": 0.5}})


def _metrics(step):
  return {"loss": 1.0 / step, "ce": 0.5 / step, "mask_bce": 0.25 * step, "grad_norm": float(step),
          "update_skipped": False, "task_ce_sum": np.array([step, 2.0]),
          "task_tokens": np.array([1.0, 1.0]), "learning_rate": 1e-3 * step, "tokens": 10 * step}


def _logger(workdir, start_step=0):
  return progress_lib.ProgressLogger(epath.Path(workdir), _config(), TASKS, None, None,
                                     start_step=start_step)


def _run(logger, steps, every=4, bad=None):
  for step in steps:
    logger.update(_metrics(step), examples=8)
    if step % every == 0:
      logger.flush(step, bad_records=bad)


def _entries(workdir):
  timing = {"examples_per_s", "tokens_per_s", "mfu"}
  return [{k: v for k, v in json.loads(line).items() if k not in timing}
          for line in (workdir / "train_log.jsonl").read_text().splitlines()]


def test_tokens_come_from_the_step_metric_and_bad_records_are_logged(tmp_path, capsys):
  logger = _logger(tmp_path)
  _run(logger, range(1, 5), bad={"too_long": 2, "corrupt_image": 0})
  line = capsys.readouterr().out
  assert "bad records skipped: too_long 2" in line and "corrupt_image" not in line
  entry = json.loads((tmp_path / "train_log.jsonl").read_text())
  assert entry["bad_records/too_long"] == 2 and "bad_records/corrupt_image" not in entry
  # 100 tokens in the interval (10+20+30+40), however fast it ran.
  assert abs(entry["tokens_per_s"] / entry["examples_per_s"] - 100 / 32) < 1e-9


def test_resume_after_cut_interval_and_kill_logs_as_the_uninterrupted_run(tmp_path):
  straight = tmp_path / "straight"
  straight.mkdir()
  _run(_logger(straight), range(1, 13))

  run = tmp_path / "run"
  run.mkdir()
  first = _logger(run)
  _run(first, range(1, 6))  # SIGTERM after step 5: interval 5-8 cut, saved with checkpoint 5
  first.save_state(5, keep_steps=[])
  second = _logger(run, start_step=5)
  second.restore_state(5, log=print)
  _run(second, range(6, 11))  # SIGKILL after step 10; entry 8 was written after checkpoint 5
  third = _logger(run, start_step=5)  # resumes from checkpoint 5 again
  third.restore_state(5, log=print)
  _run(third, range(6, 13))
  assert [e["step"] for e in _entries(run)] == [4, 8, 12]
  assert _entries(run) == _entries(straight)


def test_state_files_follow_the_checkpoints(tmp_path):
  logger = _logger(tmp_path)
  _run(logger, range(1, 3))
  logger.save_state(2, keep_steps=[])
  logger.save_state(4, keep_steps=[2])
  logger.save_state(6, keep_steps=[4])  # checkpoint 2 is gone
  assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == ["4.json", "6.json"]
  messages = []
  _logger(tmp_path, start_step=3).restore_state(3, log=messages.append)  # no file: said
  assert "cannot be continued" in messages[0]


def test_truncate_log_drops_later_and_cut_lines(tmp_path):
  path = epath.Path(tmp_path / "train_log.jsonl")
  path.write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8, "lo')
  progress_lib.truncate_log(path, 4)
  assert path.read_text() == '{"step": 2}\n{"step": 4}\n'
