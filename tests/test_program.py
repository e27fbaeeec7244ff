"""Programs are plain data; configs are typed and overridable from the command line."""
import dataclasses

import pytest

from chorus import agents
from chorus import configs
from chorus.launch import cli
from chorus.launch import experiment
from chorus.launch import program


def _config(**changes):
  return dataclasses.replace(configs.get_config('text_vtrace'), **changes)


def test_program_spreads_actor_processes_over_inference_and_replay_servers():
  nodes = program.make_program(_config(num_actors=8, actors_per_process=2,
                                       num_inference_servers=2, num_replay_servers=2))
  by_name = {node.name: node for node in nodes}
  actors = [by_name[f'actors_{i}'] for i in range(4)]
  assert [a.kwargs['actor_ids'] for a in actors] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert [a.kwargs['inference_address'].node for a in actors] == [
      'inference_server_0', 'inference_server_1'] * 2
  assert [a.kwargs['replay_address'].node for a in actors] == ['replay_0', 'replay_1'] * 2
  learner = by_name['learner']
  assert learner.kind == program.MAIN and learner.restart and learner.accelerator
  assert [a.node for a in learner.kwargs['inference_addresses']] == [
      'inference_server_0', 'inference_server_1']
  assert by_name['replay_0'].restart  # From its tables' newest checkpoint.
  assert all(by_name[f'inference_server_{i}'].accelerator for i in range(2))
  assert not any(a.accelerator for a in actors)


def test_a_learner_of_several_processes_is_one_main_node_per_process_joined_to_the_first():
  config = experiment.apply_overrides(_config(), ['learner.processes=3', 'learner.batch_size=12'])
  learners = [n for n in program.make_program(config) if n.role == 'learner']
  assert [n.name for n in learners] == ['learner', 'learner_process_1', 'learner_process_2']
  assert all(n.kind == program.MAIN and n.accelerator and not n.restart for n in learners)
  assert [n.serves for n in learners] == [True, False, False]  # The coordination service.
  assert [n.kwargs['process_index'] for n in learners] == [0, 1, 2]
  assert [n.kwargs['coordinator'] for n in learners] == [None] + [program.Address('learner')] * 2
  single = [n for n in program.make_program(_config()) if n.role == 'learner']
  assert len(single) == 1 and single[0].restart and not single[0].serves
  assert 'process_index' not in single[0].kwargs


def test_a_batch_that_processes_cannot_share_equally_is_refused():
  config = experiment.apply_overrides(_config(), ['learner.processes=4', 'learner.batch_size=6'])
  with pytest.raises(ValueError, match='batch_size=6 must be a multiple of learner.processes=4'):
    config.check()


def test_uneven_actor_count_puts_the_rest_in_the_last_process():
  nodes = program.make_program(_config(num_actors=5, actors_per_process=2))
  assert [n.kwargs['actor_ids'] for n in nodes if n.role == 'actor'] == [[0, 1], [2, 3], [4]]


def test_evaluator_node_exists_only_when_enabled():
  enabled = experiment.apply_overrides(_config(), ['evaluation.every_s=5'])
  disabled = experiment.apply_overrides(_config(), ['evaluation.every_s=0'])
  assert 'evaluator' in [n.name for n in program.make_program(enabled)]
  assert 'evaluator' not in [n.name for n in program.make_program(disabled)]


def test_resolve_replaces_address_handles_inside_lists_and_dicts():
  kwargs = {'a': program.Address('x'), 'b': [program.Address('y'), 3], 'c': {'d': 'plain'}}
  resolved = program.resolve(kwargs, {'x': '127.0.0.1:1', 'y': '127.0.0.1:2'})
  assert resolved == {'a': '127.0.0.1:1', 'b': ['127.0.0.1:2', 3], 'c': {'d': 'plain'}}
  with pytest.raises(KeyError, match='unknown'):
    program.resolve(program.Address('unknown'), {})


def test_overrides_parse_types_and_reject_unknown_fields_with_the_known_ones():
  config = experiment.apply_overrides(_config(), [
      'learner.batch_size=64', 'agent.kl_coef=0.1', 'model.decoder.logit_softcap=30',
      'actor.model=policy', 'num_actors=2'])
  assert (config.learner.batch_size, config.agent.kl_coef, config.model.decoder.logit_softcap,
          config.num_actors) == (64, 0.1, 30.0, 2)
  with pytest.raises(ValueError, match="no field 'batchsize'.*batch_size"):
    experiment.apply_overrides(config, ['learner.batchsize=3'])
  with pytest.raises(ValueError, match='expected a value of type int'):
    experiment.apply_overrides(config, ['learner.batch_size=many'])
  with pytest.raises(ValueError, match='is a group'):
    experiment.apply_overrides(config, ['learner=3'])
  with pytest.raises(ValueError, match='num_actors must be >= 1'):
    experiment.apply_overrides(config, ['num_actors=0'])


def test_config_round_trips_through_plain_dicts():
  config = experiment.apply_overrides(_config(), ['learner.max_steps=7', 'seed=9'])
  assert experiment.from_dict(experiment.ExperimentConfig, experiment.to_dict(config)) == config


def test_a_tag_switches_the_agent_to_its_defaults_and_fields_of_it_set_after():
  config = experiment.apply_overrides(_config(), [
      'agent=bond', 'agent.beta=0.25', 'agent.reward_model.kind=learned'])
  assert isinstance(config.agent, agents.BondConfig)
  assert (config.agent.beta, config.agent.reward_model.kind) == (0.25, 'learned')
  assert experiment.to_dict(config)['agent']['tag'] == 'bond'
  assert experiment.from_dict(experiment.ExperimentConfig, experiment.to_dict(config)) == config
  with pytest.raises(ValueError, match=r"Unknown AgentConfig tag 'trpo'.*'vtrace'"):
    experiment.apply_overrides(_config(), ['agent=trpo'])
  with pytest.raises(ValueError, match="VTraceConfig has no field 'beta'"):
    experiment.apply_overrides(_config(), ['agent.beta=0.5'])


def test_cli_rejects_a_bad_override_before_starting_anything(tmp_path, capsys):
  run_dir = tmp_path / 'never'
  assert cli.main(['run', '--run-dir', str(run_dir), '--set', 'learner.nope=1']) == 2
  assert "no field 'nope'" in capsys.readouterr().err
  assert not run_dir.exists()


def test_cli_lists_configs_with_their_descriptions_and_shows_defaults(capsys):
  assert cli.main(['configs']) == 0
  listing = capsys.readouterr().out.splitlines()
  assert len(listing) == len(configs.CONFIG_NAMES)
  assert listing[0].split(maxsplit=1) == ['text_vtrace', configs.description('text_vtrace')]
  assert configs.description('text_vtrace').startswith('V-trace RL on digit reversal')
  assert cli.main(['configs', 'text_vtrace']) == 0
  assert '"max_steps": 600' in capsys.readouterr().out


def _roles(config) -> dict[str, list[str]]:
  roles = {}
  for node in program.make_program(config):
    roles.setdefault(node.role, []).append(node.name)
  return roles


@pytest.mark.parametrize('name', configs.CONFIG_NAMES)
def test_every_config_builds_a_program_and_round_trips(name):
  config = configs.get_config(name)
  assert config.name == name
  assert experiment.from_dict(experiment.ExperimentConfig, experiment.to_dict(config)) == config
  roles = _roles(config)
  assert roles['learner'] == ['learner'] and roles['warm_start'] == ['warm_start']


def test_learned_reward_model_adds_a_setup_node_before_the_servers():
  nodes = program.make_program(configs.get_config('text_bond'))
  assert nodes[1].name == 'reward_model' and nodes[1].kind == program.SETUP
  assert nodes[1].role == 'setup' and nodes[1].kwargs == {'step': 'reward_model'}
  assert nodes[1].accelerator
  programmatic = experiment.apply_overrides(configs.get_config('text_bond'),
                                            ['agent.reward_model.kind=programmatic'])
  assert 'setup' not in _roles(programmatic)


def test_offline_soft_q_replays_the_dataset_instead_of_running_actors():
  config = experiment.apply_overrides(configs.get_config('text_soft_q'),
                                      ['replay_dataset=/data/run/rlds'])
  roles = _roles(config)
  assert 'actor' not in roles and roles['dataset_replayer'] == ['dataset_replayer']
  replayer = next(n for n in program.make_program(config) if n.role == 'dataset_replayer')
  assert not replayer.restart  # A second pass would store every episode twice.
  assert [a.node for a in replayer.kwargs['replay_addresses']] == ['replay_0']


def test_inverse_soft_q_reads_demonstrations_without_replay_or_actors():
  roles = _roles(configs.get_config('text_irl'))
  assert 'replay' not in roles and 'actor' not in roles and 'dataset_replayer' not in roles
  assert roles['setup'] == ['demonstrations']
  with_dataset = experiment.apply_overrides(configs.get_config('text_irl'),
                                            ['replay_dataset=/data/demos'])
  assert 'setup' not in _roles(with_dataset)


def test_configs_reject_combinations_that_cannot_train():
  with pytest.raises(ValueError, match="replay_dataset needs an off-policy agent"):
    experiment.apply_overrides(configs.get_config('text_vtrace'), ['replay_dataset=/data']).check()
  with pytest.raises(ValueError, match='Use a music task'):
    experiment.apply_overrides(configs.get_config('text_vtrace'), ['agent=cfg_distill']).check()
  with pytest.raises(ValueError, match="no `preference_pair`.*kind=programmatic"):
    experiment.apply_overrides(configs.get_config('music_vtrace'), [
        'agent=bond', 'agent.reward_model.kind=learned']).check()


def test_a_damaged_replay_dataset_stops_the_cli_before_anything_starts(tmp_path, capsys):
  from chorus.datasets import EpisodeLogger  # pylint: disable=g-import-not-at-top
  from test_rlds_episodes import random_trajectories  # pylint: disable=g-import-not-at-top
  dataset = tmp_path / 'rlds' / 'actor_000'
  with EpisodeLogger(dataset, max_episodes_per_file=2) as logger:
    for trajectory in random_trajectories(0, 4):
      logger.write(dataclasses.replace(trajectory, extras={}))
  damaged = dataset / 'chorus_episodes-train.tfrecord-00000'
  damaged.write_bytes(damaged.read_bytes()[:-10])
  run_dir = tmp_path / 'never'
  assert cli.main(['run', '--config', 'text_soft_q', '--run-dir', str(run_dir),
                   '--replay-dataset', str(tmp_path / 'rlds')]) == 2
  error = capsys.readouterr().err
  assert str(damaged) in error and '--skip-corrupt' in error
  assert len(error.strip().splitlines()) == 1 and not run_dir.exists()
  # With --skip-corrupt the check passes: the run would read the other file.
  experiment.apply_overrides(configs.get_config('text_soft_q'), [
      f'replay_dataset={tmp_path / "rlds"}', 'skip_corrupt=true']).check()
