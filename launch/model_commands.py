"""`chorus sample` and `chorus export`: see that a checkpoint loaded, and take a tuned one out.

    chorus sample --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--seed S]
    chorus sample --run-dir RUN [--step N] --prompt TEXT ...
    chorus export --run-dir RUN [--step N] --output DIR

Both handlers import JAX only when they run, so the parsers cost nothing to build.
"""
import sys


def _sample(args) -> int:
  from chorus.launch import policy_io  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    if args.model:
      policy = policy_io.from_checkpoint(args.model, args.dtype)
    else:
      policy, _ = policy_io.from_run(args.run_dir, args.step)
    _, text = policy_io.complete_text(policy, args.prompt, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seed=args.seed)
  except (FileNotFoundError, ValueError) as error:
    print(f'chorus sample: {error}', file=sys.stderr)
    return 2
  print(text)
  return 0


def _export(args) -> int:
  from chorus.launch import policy_io  # pylint: disable=g-import-not-at-top  (imports JAX)
  try:
    step, written = policy_io.export_run(args.run_dir, args.output, args.step)
  except (FileNotFoundError, ValueError) as error:
    print(f'chorus export: {error}', file=sys.stderr)
    return 2
  print(f'Exported step {step} of {args.run_dir} to {args.output}: '
        + ', '.join(path.rsplit('/', 1)[-1] for path in written))
  return 0


def add_model_parsers(commands) -> None:
  """Adds `sample` and `export` to the `chorus` command's subparsers."""
  sample = commands.add_parser(
      'sample', help="print a checkpoint's (or a run's policy's) completion of a prompt")
  source = sample.add_mutually_exclusive_group(required=True)
  source.add_argument('--model', metavar='DIR',
                      help='Hugging Face-layout checkpoint directory (config.json, safetensors, '
                      'tokenizer.model or tokenizer.json)')
  source.add_argument('--run-dir', metavar='RUN',
                      help="a run's policy: its latest learner checkpoint, else its warm start")
  sample.add_argument('--step', type=int, help='with --run-dir: this learner checkpoint')
  sample.add_argument('--prompt', required=True, help='the prompt, as text (BOS is prepended)')
  sample.add_argument('--max-new-tokens', type=int, default=32,
                      help='tokens to sample at most (default: 32)')
  sample.add_argument('--temperature', type=float, default=1.0,
                      help='sampling temperature; 0 is greedy (default: 1.0)')
  sample.add_argument('--seed', type=int, default=0, help='sampling seed (default: 0)')
  sample.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='with --model: weights and compute dtype (default: float32)')
  sample.set_defaults(handler=_sample)
  export = commands.add_parser(
      'export', help="write a run's tuned policy as a Hugging Face-layout checkpoint")
  export.add_argument('--run-dir', required=True, metavar='RUN', help='the run to export')
  export.add_argument('--step', type=int,
                      help='learner checkpoint step (default: the latest, else the warm start)')
  export.add_argument('--output', required=True, metavar='DIR',
                      help='directory to write config.json, safetensors and tokenizer files to')
  export.set_defaults(handler=_export)
