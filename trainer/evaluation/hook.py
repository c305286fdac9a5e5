"""The training hook: evaluation inside a run (`Components.evaluate` of trainer/loop.py).

`hook(model, step) -> flat metrics` for metrics.jsonl; the full results go to
`<run out_dir>/eval/step_XXXXXXXX.json`. The loop calls it every `eval.every_steps` steps and at the
end of the run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trainer.evaluation.config import EvalConfig
from trainer.evaluation.data import EvalTransform
from trainer.evaluation.runner import Evaluator, flat_metrics, save_results


class EvalHook:
    """Evaluates with `cfg` and writes each step's full results into `out_dir` (None: not written).
    The data listing is made at the first call, so a run fails on bad evaluation data only when it
    first evaluates."""

    def __init__(self, cfg: EvalConfig, transform: EvalTransform, tokenizer: Callable | None = None,
                 out_dir: str | Path | None = None):
        self.cfg, self.transform, self.tokenizer = cfg, transform, tokenizer
        self.out_dir = Path(out_dir) if out_dir else None
        self.evaluator: Evaluator | None = None

    def __call__(self, model, step: int) -> dict[str, float]:
        if self.evaluator is None:
            self.evaluator = Evaluator(self.cfg, self.transform, self.tokenizer, progress=False)
        results = self.evaluator(model, step)
        if self.out_dir is not None:
            save_results(results, self.out_dir / f"step_{step:08d}.json")
        return flat_metrics(results)


def make_train_hook(run_cfg, tokenizer: Callable | None = None) -> EvalHook | None:
    """The hook of a RunConfig: its `eval` section, images prepared as its recipe says, results under
    `<out_dir>/eval/`. None when the run has no evaluation data."""
    if not run_cfg.eval.data:
        return None
    return EvalHook(run_cfg.eval, EvalTransform.from_recipe(run_cfg.data.recipe), tokenizer,
                    out_dir=Path(run_cfg.out_dir) / "eval")
