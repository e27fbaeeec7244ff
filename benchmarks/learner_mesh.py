"""Learner step time and memory per device of the `small` model on 1 and 8 host devices.

One V-trace learner (`small`: 6 layers, width 384, about 13M parameters; a character
vocabulary) on batches of 32 digit-reversal trajectories, on one device and on meshes of
8 host CPU devices (data, fsdp, tensor). Per mesh: seconds and CPU-seconds per update
(after compilation), the train state (parameters and Adam moments) held per device, from
the arrays' shardings, and XLA's memory analysis of the compiled update per device
(arguments + outputs + temporaries: the peak the update needs).

Host devices share this machine's cores, so the 8-device times measure partitioning
overhead, not a speed-up; on GPUs and TPUs each device brings its own compute.

    .venv/bin/python benchmarks/learner_mesh.py [--steps 5] [--output benchmarks/RESULTS.md]
"""
import argparse
import json
import os
import subprocess
import sys
import time

from chorus.benchmarks import results

SECTION_TITLE = 'Learner on a device mesh'
_MESHES = [None, (8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]


def _measure(steps: int) -> list[dict]:
  """Runs in a process with 8 host devices."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from chorus import core
  from chorus import models
  from chorus.actors import demonstrations
  from chorus.actors import reverse_digits
  from chorus.agents import builder as builder_lib
  from chorus.agents import vtrace
  from chorus.learners import learner as learner_lib
  from chorus.models import sharding

  task = reverse_digits.ReverseDigitsTask()
  decoder = models.DecoderConfig.small(task.tokenizer.vocab_size)
  params = models.init_params(decoder, jax.random.PRNGKey(0))
  spec = core.SequenceSpec(16, 12)
  rng = np.random.default_rng(0)
  batch = demonstrations.off_policy_batch(task, rng, 32, spec)
  rows = []
  for shape in _MESHES:
    mesh = None if shape is None else sharding.make_mesh(sharding.MeshConfig(*shape),
                                                         jax.devices())
    mesh_devices = 1 if shape is None else int(np.prod(shape))
    learner = vtrace.make_vtrace_learner(builder_lib.LearnerContext(
        model=decoder, sequence=spec, task=task, params=params, reference_params=params,
        optimizer=learner_lib.make_optimizer(1e-4, 1.0), mesh=mesh), vtrace.VTraceConfig())
    learner.update(batch)  # Compiles.
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(steps):
      learner.update(batch)
    wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps
    state = (learner.state.params, learner.state.opt_state)
    held = sharding.bytes_per_device(state)
    analysis = learner.memory_analysis(batch)
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    rows.append(dict(mesh='1 device' if shape is None else f'{shape} of {mesh_devices}',
                     step_s=wall, step_cpu_s=cpu, state_mb_per_device=max(held.values()) / 1e6,
                     peak_mb_per_device=peak / 1e6,
                     parameters=sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))))
  return rows


def _table(rows: list[dict]) -> str:
  lines = ['| mesh (data, fsdp, tensor) | s / update | CPU-s / update | train state MB per device '
           '| compiled update MB per device |', '|:---|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['mesh']} | {r['step_s']:.3f} | {r['step_cpu_s']:.3f} | "
                 f"{r['state_mb_per_device']:.1f} | {r['peak_mb_per_device']:.1f} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--output', default='benchmarks/RESULTS.md', help="'-' only prints")
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args.steps)))
    return 0
  load = results.load_average()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  child = subprocess.run([sys.executable, __file__, '--child', '--steps', str(args.steps)],
                         env=env, capture_output=True, text=True, check=True)
  rows = json.loads(child.stdout.splitlines()[-1])
  text = '\n'.join([
      f'## {SECTION_TITLE}', '',
      f'- Command: `.venv/bin/python benchmarks/learner_mesh.py {" ".join(argv or sys.argv[1:])}`',
      results.date_machine_load(load, results.load_average()),
      f'- Model: `small`, {rows[0]["parameters"] / 1e6:.1f}M parameters; V-trace, batch 32, '
      f'prompt 16 + completion 12 tokens, Adam; {args.steps} timed updates per mesh; 8 host '
      'CPU devices on the machine\'s 2 cores.', '', _table(rows), ''])
  if args.output != '-':
    results.write_section(args.output, SECTION_TITLE, text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
