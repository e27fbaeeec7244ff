"""RLDS episodes of a run: written per actor, read back as one dataset, replayed into training."""
from chorus import lazy

_MODULE_OF = {
    'ForeignDatasetMapping': 'foreign',
    'dataset_prompts': 'replay',
    'DatasetPrompt': 'replay',
    'fill_replay': 'replay',
    'trajectory_batches': 'replay',
    'CorruptEpisodeFileError': 'rlds_files',
    'Directories': 'rlds_files',
    'episode_directories': 'rlds_files',
    'SkippedFile': 'rlds_files',
    'episode_dataset': 'rlds_reader',
    'episode_sources': 'rlds_reader',
    'EpisodeRead': 'rlds_reader',
    'EpisodeSources': 'rlds_reader',
    'read_episodes': 'rlds_reader',
    'read_trajectories': 'rlds_reader',
    'repair_episode_directory': 'rlds_repair',
    'RepairReport': 'rlds_repair',
    'DEFAULT_DATASET_NAME': 'rlds_schema',
    'DEFAULT_MAX_EPISODES_PER_FILE': 'rlds_writer',
    'EpisodeLogger': 'rlds_writer',
}
__all__ = sorted(_MODULE_OF)

__getattr__ = lazy.exports(__name__, _MODULE_OF)
