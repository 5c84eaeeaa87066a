"""Packaged Hydra configs (pkg://spec_torch.apps.configs); see spec_torch.apps.config."""
