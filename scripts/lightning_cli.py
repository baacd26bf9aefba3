"""LightningCLI for lightning-prune: ``python scripts/lightning_cli.py fit --config config.yaml``.

Trains an :class:`~lightning_prune.models.ImageClassifier` around any network (``model.model``, by default
:class:`~lightning_prune.models.SmallCNN`) on any of the package's data modules (``data``, by default the bundled
8x8 digits, :class:`~lightning_prune.data.DigitsDataModule`), with the callbacks listed in ``trainer.callbacks``,
e.g. :class:`~lightning_prune.PruningCallback`. Every argument can come from the YAML file or the command line::

    python scripts/lightning_cli.py fit --config config.yaml
    python scripts/lightning_cli.py fit --config config.yaml --trainer.max_epochs=10
    python scripts/lightning_cli.py fit --config config.yaml --print_config   # every value, defaults included

Needs ``pip install "lightning-prune[cli]"`` (jsonargparse).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_prune.data import ClassificationDataModule
from lightning_prune.models import ImageClassifier


class PruningCLI(LightningCLI):
    """LightningCLI with the digits and the small CNN as the defaults of ``data`` and ``model.model``."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model.model": {"class_path": "lightning_prune.models.SmallCNN"},
                "data": {"class_path": "lightning_prune.data.DigitsDataModule"},
            }
        )


def main(args: list[str] | None = None) -> PruningCLI:
    """Parse ``args`` (default: the command line), then run the subcommand it names (``fit``, ``test``, ...)."""
    return PruningCLI(
        ImageClassifier,
        ClassificationDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
