"""lightning-prune's Hydra configs, installed as the package ``lightning_prune.conf`` (``pkg://lightning_prune.conf``)."""
