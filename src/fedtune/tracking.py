"""Optional experiment trackers: TensorBoard, MLflow, Weights & Biases. Never required.

Each tracker gets every round's metrics row; it is imported only when a recipe turns it on,
so none of these packages is a dependency of fedtune. Add your own with `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _numeric(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    }


class TensorBoard:
    def __init__(self, run_dir: Path, cfg):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", f"```\n{cfg.to_json()}\n```")

    def log(self, row: dict) -> None:
        for key, value in _numeric(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, cfg):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=Path(run_dir).name)
        flat = {f"{s}.{k}": v for s, sub in cfg.to_dict().items() for k, v in sub.items()}
        mlflow.log_params({k: str(v)[:250] for k, v in flat.items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(_numeric(row), step=int(row["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, run_dir: Path, cfg):
        import wandb

        self.run = wandb.init(
            project="fedtune", name=Path(run_dir).name, config=cfg.to_dict(), dir=str(run_dir)
        )

    def log(self, row: dict) -> None:
        self.run.log(_numeric(row), step=int(row["round"]))

    def close(self) -> None:
        self.run.finish()


REGISTRY: dict[str, Callable] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def register(name: str, factory: Callable) -> None:
    """Plug in a tracker: `factory(run_dir, cfg)` returns an object with log(row), close()."""
    REGISTRY[name] = factory


def open_trackers(run_dir: Path, cfg) -> list:
    names = (["tensorboard"] if cfg.output.tensorboard else []) + list(cfg.output.trackers)
    return [REGISTRY[name](run_dir, cfg) for name in names]
