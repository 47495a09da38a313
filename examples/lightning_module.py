"""PyTorch Lightning: ``configure_optimizers`` returns a ``metaopt.LearnedOptimizer``
(with an LR scheduler), and a callback marks task boundaries for continual learning.

Trains an MLP on two Split-digits tasks in sequence with one ``Trainer`` per task (the
model and the optimizer's state carry over), then saves a Lightning checkpoint and
resumes from it. Needs ``pip install "metaopt[integrations]"`` (Lightning).

    python examples/lightning_module.py
    python examples/lightning_module.py --smoke
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

import metaopt
from metaopt.continual import data, streams


class Classifier(L.LightningModule):
    """An MLP classifier whose optimizer is the learned optimizer."""

    def __init__(self, n_inputs: int, n_outputs: int, lr: float = 1e-3, epochs: int = 3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(n_inputs, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, n_outputs),
        )
        self.optimizer: metaopt.LearnedOptimizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # One optimizer for the whole stream: each Trainer.fit (one per task) calls this
        # again, and the learned state (anchors, importance) must carry over.
        if self.optimizer is None:
            self.optimizer = metaopt.LearnedOptimizer.from_pretrained(
                "default", self.parameters(), lr=self.hparams.lr
            )
        for group in self.optimizer.param_groups:  # the last task's schedule ended at ~0
            group["lr"] = self.hparams.lr
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.hparams.epochs
        )
        return {"optimizer": self.optimizer, "lr_scheduler": scheduler}


class NewTaskCallback(L.Callback):
    """Calls ``optimizer.new_task()`` when a fit on a new task starts (after the first)."""

    def __init__(self) -> None:
        self.fits = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fits > 0:
            for optimizer in trainer.optimizers:
                if hasattr(optimizer, "new_task"):
                    optimizer.new_task()
        self.fits += 1


def loader(task: streams.Task, train: bool) -> torch.utils.data.DataLoader:
    x, y = (task.x_train, task.y_train) if train else (task.x_test, task.y_test)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=train,
        generator=torch.Generator().manual_seed(0) if train else None,
    )


def accuracy(model: Classifier, task: streams.Task) -> float:
    with torch.no_grad():
        return (model(task.x_test).argmax(1) == task.y_test).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="lightning-out", help="checkpoint folder")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    epochs = 2 if args.smoke else args.epochs
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.manual_seed(0)

    x, y = data.load_digits_tensors("train")
    xt, yt = data.load_digits_tensors("test")
    stream = streams.split_stream(x, y, xt, yt, n_tasks=2, scenario="domain", seed=0)
    model = Classifier(64, streams.n_outputs(stream), lr=3e-3, epochs=epochs)
    callback = NewTaskCallback()
    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, max_epochs=epochs,
    )
    results = {}
    trainer = None
    for task in stream:
        trainer = L.Trainer(callbacks=[callback], **options)
        trainer.fit(model, loader(task, train=True))
        optimizer = trainer.optimizers[0]
        accs = [round(accuracy(model, t), 3) for t in stream]
        results[f"acc_after_task{task.task_id}"] = accs
        print(f"after {task.name}: accuracy per task {accs}, task index {optimizer.task_index}")
    results["task_index"] = optimizer.task_index

    # Lightning checkpoints carry the optimizer's state_dict; resuming restores it
    # (including the task index) into the optimizer that configure_optimizers builds.
    ckpt = Path(args.out) / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = Classifier(64, streams.n_outputs(stream), lr=3e-3, epochs=epochs)
    trainer = L.Trainer(**{**options, "max_epochs": epochs + 1})
    trainer.fit(resumed, loader(stream[-1], train=True), ckpt_path=ckpt)
    results["resumed_task_index"] = trainer.optimizers[0].task_index
    results["resumed_state_entries"] = len(trainer.optimizers[0].state)
    print(
        f"resumed from {ckpt}: task index {results['resumed_task_index']}, optimizer state "
        f"for {results['resumed_state_entries']} parameters"
    )
    return results


if __name__ == "__main__":
    main()
