"""Expert load balancing, applied to the model from outside: monitoring, aux-loss-free bias updates,
balance losses, a balanced-routing diagnostic, and redundant-expert placement."""

from .bias import BiasBalancer
from .losses import RouterProbe, balance_loss, balanced_assignment, install_balanced_routing
from .monitor import device_load, gather_counts, load_stats, max_vio, moe_modules, reset_counts

__all__ = ["BiasBalancer", "RouterProbe", "balance_loss", "balanced_assignment", "device_load", "gather_counts",
           "install_balanced_routing", "load_stats", "max_vio", "moe_modules", "reset_counts"]
