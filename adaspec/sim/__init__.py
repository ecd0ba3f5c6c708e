"""Paper-scale simulation: the engine's scheduler and policies on modelled step times and acceptance."""
