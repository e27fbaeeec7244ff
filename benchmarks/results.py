"""What every benchmark's report shares: the machine, its load, and RESULTS.md sections."""
import datetime
import os
import platform
import re

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')


def machine() -> str:
  """CPU model (with family/model: VMs often show only the brand), cores, memory, kernel."""
  model = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpuinfo = f.read()
    fields = {key: re.search(rf'^{key}\s*:\s*(.+)$', cpuinfo, re.MULTILINE)
              for key in ('model name', 'cpu family', 'model')}
    if fields['model name']:
      model = fields['model name'].group(1).strip()
    if fields['cpu family'] and fields['model']:
      model += (f' (family {fields["cpu family"].group(1).strip()}, '
                f'model {fields["model"].group(1).strip()})')
  except OSError:
    pass
  memory = ''
  try:
    with open('/proc/meminfo') as f:
      match = re.search(r'^MemTotal:\s+(\d+) kB', f.read(), re.MULTILINE)
    memory = f', {int(match.group(1)) / 2**20:.0f} GiB RAM' if match else ''
  except OSError:
    pass
  return f'{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.release()}'


def load_average() -> float:
  """The machine's 1-minute load average (/proc/loadavg): how shared the cores were."""
  return os.getloadavg()[0]


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')


def date_machine_load(load_before: float, load_after: float) -> str:
  """A section's "- Date: ...; machine: ...; 1-minute load average ..." line."""
  return (f'- Date: {now()}; machine: {machine()}; 1-minute load average '
          f'{load_before:.2f} before, {load_after:.2f} after')


def process_cpu_seconds(pid: int) -> float:
  """user + system CPU-seconds of a live process (/proc/PID/stat utime + stime)."""
  with open(f'/proc/{pid}/stat') as file:
    fields = file.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def write_section(path: str, title: str, section: str):
  """Replaces the `## title` section of `path` by `section`, keeping every other section.

  A "### Reading" subsection (prose written by a person about a run) is kept at the end
  of the new section; its title names the run it was written for, so a rerun shows
  when the prose is older than the numbers.
  """
  text = ''
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if not text.strip():
    text = '# Benchmark results\n\n'
  pattern = re.compile(rf'^## {re.escape(title)}\n.*?(?=^## |\Z)', re.MULTILINE | re.DOTALL)
  match = pattern.search(text)
  if match:
    reading = re.search(r'^### Reading.*', match.group(0), re.MULTILINE | re.DOTALL)
    if reading:
      section = section.rstrip('\n') + '\n\n' + reading.group(0).rstrip('\n') + '\n'
    text = text[:match.start()] + section + '\n' + text[match.end():]
  else:
    text = text.rstrip('\n') + '\n\n' + section + '\n'
  with open(path, 'w') as f:
    f.write(text.rstrip('\n') + '\n')
