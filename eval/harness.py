"""fourfold checkpoints in EleutherAI's lm-evaluation-harness: the model `fourfold`.

    python -m eval.harness --model fourfold --model_args workdir=runs/x,batch_size=16 \\
      --tasks fourfold_mc,fourfold_ppl --include_path eval/harness_tasks

takes lm_eval's own arguments: it registers the model, then runs lm_eval's command line
(lm_eval 0.4.13 finds models only in its registry; nothing reads a package's entry points,
so the plain `lm_eval` command cannot load a third-party model). From Python:

    lm = FourfoldLM(workdir="runs/x", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["fourfold_mc"],
                            task_manager=TaskManager(include_path="eval/harness_tasks"))

Every request goes through eval/loglik.py's `Scorer` (its docstring says what each family's
log-likelihood is): lm_eval's TemplateLM splits (context, continuation) strings with this
model's `tok_encode`, `prefix_token_id` and backend (causal, or seq2seq for an
encoder-decoder), which are the Scorer's, so `loglikelihood` here and
`Scorer.loglikelihood` score the same tokens. model_args: workdir (required), batch_size,
mc_samples and seed (diffusion draws), stride (a decoder's rolling windows, eval.score's
--stride), check_greedy (diffusion's is_greedy check).
"""

from __future__ import annotations

import dataclasses

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from eval.loglik import Scorer


@register_model("fourfold")
class FourfoldLM(TemplateLM):
  """A fourfold workdir (any family) as an lm_eval model. lm_eval's `device` and
  `max_batch_size` (which its command line always passes) are ignored: JAX places the work
  on its default devices (JAX_PLATFORMS chooses them)."""

  def __init__(
    self,
    workdir: str,
    batch_size: int | str = 16,
    mc_samples: int = 16,
    seed: int = 0,
    stride: int = 0,
    check_greedy: bool = True,
    max_batch_size: int | None = None,
    device: str | None = None,
  ):
    super().__init__()
    if not str(batch_size).isdigit():
      raise ValueError(f"batch_size={batch_size!r}: fourfold takes a positive integer (no 'auto')")
    del max_batch_size, device  # lm_eval's CLI passes both always; JAX places the work
    scorer = Scorer.from_workdir(
      str(workdir), batch_size=int(batch_size), mc_samples=int(mc_samples), seed=int(seed)
    )
    self.scorer = dataclasses.replace(scorer, stride=int(stride), check_greedy=bool(check_greedy))
    self.workdir = str(workdir)
    self.backend = self.scorer.kind.backend  # how TemplateLM splits a pair into tokens

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """model_args from the command line; a batch_size there wins over --batch_size."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    args = {**extra, **arg_dict}
    known = ("workdir", "batch_size", "mc_samples", "seed", "stride", "check_greedy")
    unknown = sorted(set(args) - {*known, "max_batch_size", "device"})
    if unknown or "workdir" not in args:
      raise ValueError(
        f"model_args {unknown or 'without workdir'}: fourfold reads {list(known)} (workdir required)"
      )
    return cls(**args)

  def get_model_info(self) -> dict:
    """What lm_eval writes into its results' config."""
    return {
      "workdir": self.workdir,
      "family": self.scorer.family,
      "loglikelihood": self.scorer.kind.means,
    }

  @property
  def eot_token_id(self) -> int:
    return self.scorer.eot_token_id

  @property
  def prefix_token_id(self) -> int:
    return self.scorer.prefix_token_id

  @property
  def max_length(self) -> int:
    return self.scorer.context

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return self.scorer.encode(string, add_special_tokens)

  def tok_decode(self, tokens, **kwargs) -> str:
    return self.scorer.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    return self.scorer.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    return self.scorer.generate_until([req.args for req in requests])


def main() -> None:
  """lm_eval's command line, with the `fourfold` model registered."""
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()


if __name__ == "__main__":
  main()
