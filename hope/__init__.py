"""hope: HOPE (self-modifying Titans + Continuum Memory System) and TITAN models, trainer, evaluation."""
__version__ = "0.1.0"
