"""The entry points' restart with huge-page malloc (earthgptx_jax/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from earthgptx_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HOST_CAN = host_memory.huge_page_environment({}) is not None


@pytest.mark.skipif(not _HOST_CAN, reason="needs glibc >= 2.35 and transparent huge pages")
def test_environment_adds_the_tunable_and_keeps_the_users():
  assert host_memory.huge_page_environment({"A": "1"}) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  # Set by the user (0 turns it off): left as it is, so no restart.
  assert host_memory.huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


@pytest.mark.skipif(not _HOST_CAN, reason="needs glibc >= 2.35 and transparent huge pages")
def test_restart_keeps_pid_argv_and_flags_and_happens_once(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(
      "import os, sys\n"
      "with open(sys.argv[1], 'a') as f:\n"
      "  f.write(f\"{os.getpid()} {os.environ.get('GLIBC_TUNABLES')} {sys.argv[2:]} "
      "{sys.flags.dont_write_bytecode}\\n\")\n"
      "from earthgptx_jax import host_memory\n"
      "host_memory.reexec_with_huge_page_malloc()\n"
      "print('done')\n")
  log = tmp_path / "starts.txt"
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = ROOT
  proc = subprocess.run([sys.executable, "-B", str(script), str(log), "--flag=a b"], env=env,
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "done\n"  # the code after the call ran once, in the restarted process
  first, second = log.read_text().splitlines()
  pid = first.split()[0]
  assert first == f"{pid} None ['--flag=a b'] 1"
  assert second == f"{pid} glibc.malloc.hugetlb=1 ['--flag=a b'] 1"


def test_user_setting_means_no_restart(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  proc = subprocess.run(
      [sys.executable, "-c", "import os; from earthgptx_jax import host_memory; "
       "host_memory.reexec_with_huge_page_malloc(); print(os.environ['GLIBC_TUNABLES'])"],
      env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == "glibc.malloc.hugetlb=0\n"
