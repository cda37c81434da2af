"""The stored-run-config guard (train/checkpointing.py check_run_config) on its own, without a run: a
restart may change a free key silently and a listed key (allow_changes); a key that defines the
run (model, tokenizer, data source, batch, queue, seed, task) is refused even when listed."""
import pytest

from blip_jax.train.checkpointing import check_run_config
from blip_jax.train.setup import ConfigError
from configs.pretrain import get_config

FIXED = {"task": "retrieval", "model.vision.width": 48, "tokenizer.vocab_size": 50, "data.source.num_examples": 100,
         "batch_size": 16, "loss.queue_size": 128, "seed": 3}


@pytest.fixture
def workdir(tmp_path):
  """A workdir whose run stored configs/pretrain.py:tiny and wrote a checkpoint."""
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  (tmp_path / "config.json").write_text(get_config("tiny").to_json_best_effort())
  return tmp_path


def changed(**flat):
  c = get_config("tiny")
  c.unlock()
  c.update_from_flattened_dict(flat)
  return c


def test_the_stored_config_itself_passes(workdir):
  check_run_config(get_config("tiny"), str(workdir))


@pytest.mark.parametrize("key", sorted(FIXED))
def test_a_fixed_key_is_refused_even_when_listed(workdir, key):
  c = changed(**{key: FIXED[key], "allow_changes": key})
  with pytest.raises(ConfigError, match="a restart cannot change") as e:
    check_run_config(c, str(workdir))
  assert key in str(e.value)


def test_a_free_or_listed_key_passes_an_unlisted_one_does_not(workdir):
  check_run_config(changed(log_every=7), str(workdir))  # free: no need to list it
  with pytest.raises(ConfigError, match="allow_changes=optim.lr"):
    check_run_config(changed(**{"optim.lr": 0.1}), str(workdir))
  check_run_config(changed(**{"optim.lr": 0.1, "allow_changes": "optim.lr"}), str(workdir))
