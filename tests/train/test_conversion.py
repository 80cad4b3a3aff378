"""Converting a float model to BitNet b1.58 by fine-tuning (`train.quant_warmup_steps`): the
run starts at the float model exactly, blends the quantizers in on schedule, and loads every
float weight, with only the new SubLN norms starting fresh (at ones)."""

import flax
import jax
import numpy as np
import pytest

from configs import llama
from configs import workdir as workdir_config
from train import trainer
from train.metrics import read_metrics


@pytest.fixture(scope="module")
def float_workdir(sweep_run):
  """The tiny full-precision gpt of tests/conftest.py's shared sweep (trained once)."""
  _, sweep_workdir, proc = sweep_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(sweep_workdir / "quant=none")


def test_conversion_starts_at_the_float_model_and_maps_every_weight(float_workdir, tmp_path):
  """`configs/workdir.py:<float run>` with model.quant=bitnet158: step 0's evaluation is the
  float run's last, bit for bit (lambda 0, SubLN blended out); lambda follows the linear
  schedule; with a learning rate of 0 the final weights are the float checkpoint's exactly,
  plus SubLN norms at their init (scales 1, biases 0)."""
  c = workdir_config.get_config(float_workdir)
  c.model.quant = "bitnet158"
  c.train.update(
    dict(steps=3, quant_warmup_steps=2, learning_rate=0.0, min_learning_rate=0.0, eval_every=3)
  )
  c.train.update(dict(warmup_steps=0, schedule="constant", checkpoint_every=3, log_every=1))
  trainer.run(c, str(tmp_path / "conv"))
  float_eval = [r["eval/loss"] for r in read_metrics(float_workdir) if "eval/loss" in r][-1]
  records = read_metrics(str(tmp_path / "conv"))
  assert records[0]["step"] == 0 and records[0]["eval/loss"] == float_eval
  mix = {r["step"]: r["train/quant_mix"] for r in records if "train/quant_mix" in r}
  assert mix == {1: 0.0, 2: 0.5, 3: 1.0}  # lambda after the updates done before each step
  assert records[-1]["eval/loss"] != float_eval  # quantized by the end

  flat = flax.traverse_util.flatten_dict
  fp_params = flat(jax.device_get(trainer.load_for_inference(float_workdir)[2]))
  conv_params = flat(jax.device_get(trainer.load_for_inference(str(tmp_path / "conv"))[2]))
  extra = {k: v for k, v in conv_params.items() if k not in fp_params}
  assert extra and all("sub_norm" in k for k in extra)
  for k, v in extra.items():
    np.testing.assert_array_equal(v, np.full_like(v, k[-1] == "scale"))
  for k, v in fp_params.items():
    np.testing.assert_array_equal(conv_params[k], v)


def test_a_conversion_that_leaves_weights_unmapped_is_refused():
  c = llama.get_config("size=tiny")
  c.model.quant, c.init_from = "bitnet158", "/ckpt"
  sub = "['params']['blocks']['mlp']['sub_norm']['scale']"
  trainer.check_conversion(c, [sub], [])  # SubLN alone is new: a conversion
  trainer.check_conversion(c, [sub, "['params']['blocks']['mlp']['up']['lora_a']"], [])
  trainer.check_conversion(c, ["['params']['classifier']['kernel']"], [])  # no SubLN: no conversion
  bias = "['params']['blocks']['mlp']['up']['bias']"
  with pytest.raises(ValueError, match=r"converts a float model .*'bitnet158'.*up'\]\['bias"):
    trainer.check_conversion(c, [sub, bias], [])
  with pytest.raises(ValueError, match=r"converts a float model .*\['head'\]"):
    trainer.check_conversion(c, [sub], ["['params']['head']['kernel']"])
