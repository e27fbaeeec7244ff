"""`chorus run --isolate-network`: a local run in a loopback-only network namespace of its own.

Reverb's server binds every interface and checks no secret (docs/reliability.md), so on a
shared machine any process could write to or drain a run's tables. In a network namespace
of its own, the run's 127.0.0.1 is a loopback that no process outside the run shares. The
launcher and every node it starts (they inherit the namespace) reach each other there, and
nothing outside reaches any of the run's ports, Reverb's and the inference servers'.
The namespace has no other interface, so the run cannot reach the network either. That is
fine for a local run, which needs nothing outside the machine.

How: the launcher replaces itself (exec, same pid, so Ctrl-C and its exit status work as
before) with `unshare --net` running the same command line. As a user other than root,
`--map-root-user` adds a user namespace, where the kernel allows unprivileged ones. The
new namespace starts with its loopback down; the re-executed launcher brings it up before
anything else.
"""
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

# Set in the re-executed launcher, and so in every node: this process is already isolated.
ENV = 'CHORUS_ISOLATED_NETWORK'
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = '16sH14x'  # struct ifreq: the interface name and its flags.


def inside() -> bool:
  """Whether this process runs in a run's own namespace (set up by `reexec_isolated`)."""
  return os.environ.get(ENV) == '1'


def _unshare_command() -> list[str]:
  path = shutil.which('unshare')
  if path is None:
    raise OSError('--isolate-network needs the `unshare` command (util-linux), which is '
                  'not on PATH; install util-linux or leave the flag out.')
  return [path, '--net'] + (['--map-root-user'] if os.geteuid() != 0 else [])


def check_available() -> None:
  """OSError, naming the cause and the fix, unless this machine lets us make a namespace."""
  command = _unshare_command()
  result = subprocess.run(command + ['--', 'true'], capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise OSError(f'--isolate-network cannot make a network namespace here '
                  f'({" ".join(command[1:])}: {result.stderr.strip()[-200:]}). Run as root, '
                  'allow unprivileged user namespaces (sysctl '
                  'kernel.unprivileged_userns_clone=1 or user.max_user_namespaces > 0), or '
                  'leave the flag out.')


def reexec_isolated(cli_args: list[str]) -> None:
  """Replaces this process with `python -m chorus.launch.cli CLI_ARGS` in a new namespace.

  Returns only if the exec itself fails (OSError).
  """
  command = _unshare_command() + ['--', sys.executable, '-m', 'chorus.launch.cli', *cli_args]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(command[0], command, dict(os.environ, **{ENV: '1'}))


def bring_up_loopback() -> None:
  """Brings up `lo`, which a new network namespace starts with down, and checks it."""
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
    request = struct.pack(_IFREQ, b'lo', 0)
    flags = struct.unpack(_IFREQ, fcntl.ioctl(probe, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(probe, _SIOCSIFFLAGS, struct.pack(_IFREQ, b'lo', flags | _IFF_UP))
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    socket.create_connection(server.getsockname(), timeout=5).close()
