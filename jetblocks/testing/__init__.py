"""Tools for testing flows: parameter perturbation (and, later, property checks)."""

from jetblocks.testing.perturb import perturb_parameters_, perturbed_copy

__all__ = ["perturb_parameters_", "perturbed_copy"]
