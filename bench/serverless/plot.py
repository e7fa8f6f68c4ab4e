"""The plot the issue asks for: per policy, each request's TTFT at its arrival (by model; a request
not served is an x at the top) and the live replicas over time."""
from __future__ import annotations

from pathlib import Path

from bench.serverless.replay import Outcome, Sample
from bench.serverless.report import SLO_TTFT_S


def plot(results: dict[str, tuple[list[Outcome], list[Sample]]], path: Path, titles: dict[str, str] | None = None) -> Path:
    """`results`: policy → (outcomes, samples). Writes a PNG at `path`."""
    import matplotlib  # noqa: PLC0415 (the bench extra: only when plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = sorted({o.model for outcomes, _ in results.values() for o in outcomes})
    colors = {model: plt.cm.tab10(i % 10) for i, model in enumerate(models)}
    figure, axes = plt.subplots(len(results), 1, figsize=(10, 3 * len(results)), sharex=True, squeeze=False)
    for axis, (policy, (outcomes, samples)) in zip(axes[:, 0], results.items()):
        served = [o for o in outcomes if o.served]
        top = max([o.ttft for o in served] + [SLO_TTFT_S]) * 1.1
        for model in models:
            mine = [o for o in served if o.model == model]
            axis.scatter([o.at for o in mine], [o.ttft for o in mine], s=8, color=colors[model], label=model)
        failed = [o for o in outcomes if not o.served]
        axis.scatter([o.at for o in failed], [top] * len(failed), marker="x", s=14, color="black",
                     label="not served" if failed else None)
        axis.axhline(SLO_TTFT_S, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel("TTFT (s)")
        axis.set_title((titles or {}).get(policy, policy), fontsize=10)
        replicas = axis.twinx()
        replicas.step([s.t for s in samples], [sum(s.replicas.values()) for s in samples], where="post",
                      color="tab:red", linewidth=1)
        replicas.set_ylabel("live replicas", color="tab:red")
        replicas.set_ylim(0, max([sum(s.replicas.values()) for s in samples] + [1]) + 1)
        replicas.yaxis.get_major_locator().set_params(integer=True)
    axes[-1, 0].set_xlabel("time (s)")
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
