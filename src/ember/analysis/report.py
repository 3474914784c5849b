"""The sensitivity report: per-op records, flags, rankings, rank correlations, JSON and the plot."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ember.analysis.statistics import spearman
from ember.kernels.linear.spec import WeightScheme
from ember.quant.plan import OpRef

METRICS = ("kl", "R", "energy", "skew", "dppl")
# what ``ranking`` accepts: the metrics, the leave-one-out gain, and that gain per bf16 byte of the op
RANKINGS = (*METRICS, "restore", "restore_per_byte")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """An op is kept in bf16 when ``kl > kl`` or ``R > dispersion`` or ``energy > energy``."""

    kl: float = 0.02
    dispersion: float = 15.0
    energy: float = 0.42


@dataclasses.dataclass(frozen=True)
class OpSensitivity:
    """What quantizing ``ref`` alone does: ``kl`` (mean KL of the next-token distributions), ``R`` (max
    over input channels of (max - min) / IQR), ``energy`` (sigma_1 / sum sigma of the weight), ``skew``
    (of the outputs), ``dppl`` (calibration perplexity change, % of the float model's); ``num_weights``
    (of its linears together); ``restore_gain`` (measured with ``--restore`` only, else None): the
    calibration perplexity drop when this op alone is restored to float inside the model with every
    decoder op quantized, % of the float model's perplexity (``ember.analysis.restore``)."""

    ref: OpRef
    kl: float
    R: float
    energy: float
    skew: float
    dppl: float
    flag: str = ""
    num_weights: int = 0
    restore_gain: float | None = None

    def flagged(self, thresholds: Thresholds, target: str = "int4") -> "OpSensitivity":
        keep = self.kl > thresholds.kl or self.R > thresholds.dispersion or self.energy > thresholds.energy
        return dataclasses.replace(self, flag="bf16" if keep else target)

    def to_dict(self) -> dict[str, Any]:
        row = {"layer": self.ref.layer, "op": self.ref.op, "kl": self.kl, "R": self.R, "energy": self.energy,
               "skew": self.skew, "dppl": self.dppl, "flag": self.flag, "num_weights": self.num_weights}
        return row if self.restore_gain is None else {**row, "restore_gain": self.restore_gain}


@dataclasses.dataclass
class SensitivityReport:
    """Every op's sensitivity under one method and weight scheme, plus the float model's calibration ppl."""

    method: str
    scheme: WeightScheme
    thresholds: Thresholds
    ops: list[OpSensitivity]
    base_ppl: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantized_ppl: float | None = None  # every decoder op quantized (measured with the restore gains)

    @property
    def has_restore(self) -> bool:
        return all(op.restore_gain is not None for op in self.ops)

    def flagged(self) -> list[OpRef]:
        return [op.ref for op in self.ops if op.flag == "bf16"]

    def ranking(self, metric: str = "kl") -> list[OpRef]:
        """Ops from the most to the least sensitive by ``metric`` (|skew| for skewness; ``restore`` by
        ``restore_gain``, ``restore_per_byte`` by ``restore_gain / num_weights``, what a byte budget buys).

        Raises:
            ValueError: unknown metric, or a restore ranking of a report measured without ``--restore``.
        """
        if metric not in RANKINGS:
            raise ValueError(f"metric must be one of {RANKINGS}, got {metric!r}")
        if metric.startswith("restore") and not self.has_restore:
            raise ValueError("this report has no restore_gain: run `ember analyze sensitivity --restore`")
        keys = {"skew": lambda op: abs(op.skew), "restore": lambda op: op.restore_gain,
                "restore_per_byte": lambda op: op.restore_gain / max(op.num_weights, 1)}
        key = keys.get(metric, lambda op: getattr(op, metric))
        return [op.ref for op in sorted(self.ops, key=key, reverse=True)]

    def rank_correlations(self) -> dict[str, float]:
        """Spearman's rho of each metric (|skew| for skewness) against the measured ``dppl``."""
        dppl = [op.dppl for op in self.ops]
        values = {"kl": [op.kl for op in self.ops], "R": [op.R for op in self.ops],
                  "energy": [op.energy for op in self.ops], "skew": [abs(op.skew) for op in self.ops]}
        if self.has_restore:
            values["restore_gain"] = [op.restore_gain for op in self.ops]
        return {name: spearman(v, dppl) for name, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.info.get("model"), "method": self.method, "bits": self.scheme.bits,
                "group_size": self.scheme.group_size, "symmetric": self.scheme.symmetric,
                "thresholds": dataclasses.asdict(self.thresholds), "calibration": self.info.get("calibration"),
                "base_ppl": self.base_ppl, "quantized_ppl": self.quantized_ppl, "dppl_unit": "percent",
                "spearman_vs_dppl": self.rank_correlations(), "layers": [op.to_dict() for op in self.ops]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityReport":
        """Read a report written by ``save`` (or ``ember analyze sensitivity``).

        Raises:
            ValueError: if the file is not a sensitivity report.
        """
        data = json.loads(Path(path).read_text())
        if "layers" not in data or "method" not in data:
            raise ValueError(f"{path} is not a sensitivity report (no 'layers' / 'method')")
        ops = [OpSensitivity(OpRef(row["layer"], row["op"]), row["kl"], row["R"], row["energy"], row["skew"],
                             row["dppl"], row.get("flag", ""), row.get("num_weights", 0), row.get("restore_gain"))
               for row in data["layers"]]
        scheme = WeightScheme(data["bits"], data["group_size"], data.get("symmetric", True))
        return cls(data["method"], scheme, Thresholds(**data["thresholds"]), ops, data["base_ppl"],
                   {"model": data.get("model"), "calibration": data.get("calibration")}, data.get("quantized_ppl"))


def plot_report(report: SensitivityReport, path: str | Path) -> None:
    """One panel per metric against the layer index, a line per op; ``lm_head`` as a star after the last layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (*METRICS, "restore_gain") if report.has_restore else METRICS
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 2.4 * len(metrics)), sharex=True)
    decoder = [op for op in report.ops if op.ref.layer is not None]
    head = [op for op in report.ops if op.ref.layer is None]
    last = max((op.ref.layer for op in decoder), default=0)
    for ax, metric in zip(axes, metrics):
        for name in dict.fromkeys(op.ref.op for op in decoder):
            rows = [op for op in decoder if op.ref.op == name]
            ax.plot([op.ref.layer for op in rows], [getattr(op, metric) for op in rows], marker=".", label=name)
        for op in head:
            ax.plot([last + 1], [getattr(op, metric)], marker="*", markersize=10, linestyle="", label="lm_head")
        if metric in ("kl", "R"):
            ax.set_yscale("log")
        elif metric in ("dppl", "restore_gain"):
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=5, fontsize=8)
    axes[-1].set_xlabel("layer (lm_head after the last)")
    fig.suptitle(f"sensitivity to {report.method} int{report.scheme.bits} g{report.scheme.group_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
