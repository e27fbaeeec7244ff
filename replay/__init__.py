"""Replay: Reverb tables and their server, the actors' TrajectoryWriter and the learner's
batch_iterator."""
from chorus import lazy

_MODULE_OF = {
    'batch_iterator': 'dataset',
    'make_tables': 'tables',
    'ReplayConfig': 'config',
    'serve': 'tables',
    'TrajectoryWriter': 'writer',
}
__all__ = sorted(_MODULE_OF)
__getattr__ = lazy.exports(__name__, _MODULE_OF)
