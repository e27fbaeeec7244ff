"""RLDS episodes of a run: written per actor, read back as one dataset."""
from chorus.datasets.rlds_episodes import CorruptEpisodeFileError
from chorus.datasets.rlds_episodes import DEFAULT_DATASET_NAME
from chorus.datasets.rlds_episodes import DEFAULT_MAX_EPISODES_PER_FILE
from chorus.datasets.rlds_episodes import episode_dataset
from chorus.datasets.rlds_episodes import episode_directories
from chorus.datasets.rlds_episodes import EpisodeLogger
from chorus.datasets.rlds_episodes import EpisodeRead
from chorus.datasets.rlds_episodes import read_episodes
from chorus.datasets.rlds_episodes import read_trajectories
from chorus.datasets.rlds_episodes import repair_episode_directory
from chorus.datasets.rlds_episodes import SkippedFile
