"""docs/config_reference.md is what `python -m chorus.launch.config_docs` prints."""
import os

from chorus.launch import config_docs
from chorus.learners.supervised import WarmStartConfig

_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                          'config_reference.md')


def test_committed_config_reference_is_up_to_date():
  with open(_REFERENCE, encoding='utf-8') as file:
    committed = file.read()
  assert committed == config_docs.reference(), (
      'docs/config_reference.md is stale; regenerate it with '
      '`python -m chorus.launch.config_docs > docs/config_reference.md`.')


def test_attribute_docs_reads_multi_line_descriptions():
  docs = config_docs.attribute_docs(WarmStartConfig)
  assert docs['steps'].startswith('optimiser steps (0 skips the warm start')
  assert 'chorus datasets filter' in docs['dataset']  # From its continuation lines.


def test_reference_lists_every_task_and_the_prompt_file_fields():
  text = config_docs.reference()
  for tag in ('prompt_file', 'user_task', 'reverse_digits'):
    assert f'`--set task={tag}`' in text
  assert '| `eval_fraction` | float | `0.1` |' in text
