"""Chorus: a SEED-style actor-learner RL system for token models.

The repository root is the package `chorus` (as SEED RL's root is `seed_rl`).
Dependency versions are pinned in constraints.txt; install with
`pip install -c constraints.txt -r requirements.txt -e .` (the Makefile does).
"""
import pathlib

import setuptools

_ROOT = pathlib.Path(__file__).parent
_PACKAGES = ['chorus'] + [
    'chorus.' + path.parent.relative_to(_ROOT).as_posix().replace('/', '.')
    for path in sorted(_ROOT.glob('*/**/__init__.py'))
    if not path.parent.relative_to(_ROOT).parts[0].startswith('.')
]


def _requirements(name):
  lines = (_ROOT / name).read_text().splitlines()
  return [line for line in lines if line and not line.startswith('#')]


setuptools.setup(
    name='chorus',
    version='0.1.0',
    description='Distributed actor-learner RL for language and music token models',
    python_requires='>=3.11,<3.12',
    package_dir={'chorus': '.'},
    packages=_PACKAGES,
    package_data={'chorus.inference_server': ['*.proto']},
    install_requires=_requirements('requirements.txt'),
    extras_require={'test': _requirements('requirements-test.txt')},
    entry_points={'console_scripts': ['chorus = chorus.launch.cli:main']},
)
