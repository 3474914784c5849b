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
    (of the outputs), ``dppl`` (calibration perplexity change, % of the float model's)."""

    ref: OpRef
    kl: float
    R: float
    energy: float
    skew: float
    dppl: float
    flag: str = ""

    def flagged(self, thresholds: Thresholds, target: str = "int4") -> "OpSensitivity":
        keep = self.kl > thresholds.kl or self.R > thresholds.dispersion or self.energy > thresholds.energy
        return dataclasses.replace(self, flag="bf16" if keep else target)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.ref.layer, "op": self.ref.op, "kl": self.kl, "R": self.R, "energy": self.energy,
                "skew": self.skew, "dppl": self.dppl, "flag": self.flag}


@dataclasses.dataclass
class SensitivityReport:
    """Every op's sensitivity under one method and weight scheme, plus the float model's calibration ppl."""

    method: str
    scheme: WeightScheme
    thresholds: Thresholds
    ops: list[OpSensitivity]
    base_ppl: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def flagged(self) -> list[OpRef]:
        return [op.ref for op in self.ops if op.flag == "bf16"]

    def ranking(self, metric: str = "kl") -> list[OpRef]:
        """Ops from the most to the least sensitive by ``metric`` (|skew| for skewness)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        key = (lambda op: abs(op.skew)) if metric == "skew" else (lambda op: getattr(op, metric))
        return [op.ref for op in sorted(self.ops, key=key, reverse=True)]

    def rank_correlations(self) -> dict[str, float]:
        """Spearman's rho of each metric (|skew| for skewness) against the measured ``dppl``."""
        dppl = [op.dppl for op in self.ops]
        values = {"kl": [op.kl for op in self.ops], "R": [op.R for op in self.ops],
                  "energy": [op.energy for op in self.ops], "skew": [abs(op.skew) for op in self.ops]}
        return {name: spearman(v, dppl) for name, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.info.get("model"), "method": self.method, "bits": self.scheme.bits,
                "group_size": self.scheme.group_size, "symmetric": self.scheme.symmetric,
                "thresholds": dataclasses.asdict(self.thresholds), "calibration": self.info.get("calibration"),
                "base_ppl": self.base_ppl, "dppl_unit": "percent", "spearman_vs_dppl": self.rank_correlations(),
                "layers": [op.to_dict() for op in self.ops]}

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
                             row["dppl"], row.get("flag", "")) for row in data["layers"]]
        scheme = WeightScheme(data["bits"], data["group_size"], data.get("symmetric", True))
        return cls(data["method"], scheme, Thresholds(**data["thresholds"]), ops, data["base_ppl"],
                   {"model": data.get("model"), "calibration": data.get("calibration")})


def plot_report(report: SensitivityReport, path: str | Path) -> None:
    """One panel per metric against the layer index, a line per op; ``lm_head`` as a star after the last layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), 1, figsize=(9, 2.4 * len(METRICS)), sharex=True)
    decoder = [op for op in report.ops if op.ref.layer is not None]
    head = [op for op in report.ops if op.ref.layer is None]
    last = max((op.ref.layer for op in decoder), default=0)
    for ax, metric in zip(axes, METRICS):
        for name in dict.fromkeys(op.ref.op for op in decoder):
            rows = [op for op in decoder if op.ref.op == name]
            ax.plot([op.ref.layer for op in rows], [getattr(op, metric) for op in rows], marker=".", label=name)
        for op in head:
            ax.plot([last + 1], [getattr(op, metric)], marker="*", markersize=10, linestyle="", label="lm_head")
        if metric in ("kl", "R"):
            ax.set_yscale("log")
        elif metric == "dppl":
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=5, fontsize=8)
    axes[-1].set_xlabel("layer (lm_head after the last)")
    fig.suptitle(f"sensitivity to {report.method} int{report.scheme.bits} g{report.scheme.group_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
