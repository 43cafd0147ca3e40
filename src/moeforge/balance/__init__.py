"""Expert load balancing, applied to the model from outside: monitoring, aux-loss-free bias updates,
balance losses, balanced and hot routing diagnostics, and redundant-expert placement."""

from .bias import BiasBalancer
from .losses import (RouterProbe, balance_loss, balanced_assignment, check_hot_factor, hot_assignment,
                     install_balanced_routing, install_hot_routing, install_routing, parse_routing)
from .monitor import device_load, gather_counts, load_stats, max_vio, moe_modules, reset_counts

__all__ = ["BiasBalancer", "RouterProbe", "balance_loss", "balanced_assignment", "check_hot_factor", "device_load",
           "gather_counts", "hot_assignment", "install_balanced_routing", "install_hot_routing", "install_routing",
           "load_stats", "max_vio", "moe_modules", "parse_routing", "reset_counts"]
