"""Zero-shot tasks through lm-evaluation-harness on the in-memory model (its HFLM wrapper).

The harness fetches its datasets from the Hugging Face Hub; without a network (or without the
package) this says so in one line instead of failing deep inside it.
"""

import importlib.util

from nsds.errors import NsdsError, first_line


def require() -> None:
    """Fail early, before any model is loaded, when the harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise NsdsError("zero-shot tasks need lm-evaluation-harness: pip install lm-eval (or nsds[eval])")


def zero_shot(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1) -> dict:
    """Accuracy-style metrics per task, e.g. {"arc_easy": {"acc,none": 0.61, ...}}."""
    require()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit)
    except Exception as err:  # dataset download failures surface as many exception types
        reason = first_line(err)
        raise NsdsError(
            f"lm-evaluation-harness could not run {', '.join(tasks)} ({reason}); its datasets come from the "
            "Hugging Face Hub and need a network"
        ) from None
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        for task, metrics in results["results"].items()
    }
